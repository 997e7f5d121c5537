"""Fine-tuning data and the training loop (through the Hugging Face Trainer).

The Trainer brings multi-GPU / distributed training (``accelerate launch``), mixed precision and
the paged optimisers; losa only builds the samples and checks the loss.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time

import torch
from torch import nn

from losa.config import TrainConfig
from losa.data import DataSpec, load_documents, read_jsonl, tokenize_documents
from losa.errors import DataError, TrainingError
from losa.report import PeakMemory

log = logging.getLogger(__name__)


def training_samples(tokenizer, spec: str, num_samples: int, seqlen: int, seed: int) -> list[list[int]]:
    """``num_samples`` token sequences of at most ``seqlen`` tokens, in a seeded order.

    Instruction data (jsonl with ``instruction``) gives one Alpaca-formatted sample per record
    (prompt and response, truncated to ``seqlen``; the authors train on the whole text too);
    plain text is cut into non-overlapping ``seqlen`` windows (causal LM).
    """
    parsed = DataSpec.parse(spec)
    gen = torch.Generator().manual_seed(seed)
    instructions = parsed.kind == "jsonl" and any("instruction" in r for r in read_jsonl(parsed.path)[:1])
    if instructions or parsed.kind == "alpaca-gpt4":  # one Alpaca-formatted record per sample, ending in EOS
        texts = load_documents(parsed, "train")
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        encoded = [ids[: seqlen - len(eos)] + eos for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        samples = [encoded[i] for i in torch.randperm(len(encoded), generator=gen).tolist()]
    else:
        tokens = tokenize_documents(tokenizer, load_documents(parsed, "train"))
        count = tokens.numel() // seqlen
        windows = tokens[: count * seqlen].view(count, seqlen)
        samples = [windows[i].tolist() for i in torch.randperm(count, generator=gen).tolist()]
    if len(samples) < num_samples:
        raise DataError(
            f"training data {spec} gives {len(samples)} samples of up to {seqlen} tokens, fewer than the "
            f"{num_samples} requested; lower --train-samples / --train-seqlen or give more data"
        )
    return samples[:num_samples]


def step_chunks(num_samples: int, steps: int) -> list[tuple[int, int]]:
    """(start, end) of each step's data: like the authors (1K of 10K for steps 1-4, the rest for
    step 5), each step but the last takes a tenth, the last the remainder; equal parts when T > 10."""
    if steps == 1:
        return [(0, num_samples)]
    per_step = num_samples // 10 if steps <= 10 else num_samples // steps
    per_step = max(per_step, 1)
    bounds = [(i * per_step, (i + 1) * per_step) for i in range(steps - 1)]
    bounds.append(((steps - 1) * per_step, num_samples))
    if bounds[-1][0] >= num_samples:
        raise DataError(f"{num_samples} training samples cannot be split over {steps} steps; give at least {steps}")
    return bounds


def _optimizer_name(config: TrainConfig, device: str) -> str:
    if config.optim != "auto":
        return config.optim
    if not device.startswith("cuda"):
        return "adamw_torch"  # paging is a GPU-memory device; on the CPU it is plain AdamW
    try:
        import bitsandbytes  # noqa: F401

        return "paged_adamw_8bit"
    except ImportError:
        log.warning("paged AdamW (the paper's optimiser) needs bitsandbytes, which is not installed: training with "
                    "adamw_torch (more GPU memory). pip install 'losa[gpu]' to use it, or pass --optim to choose.")
        return "adamw_torch"


def _loss_bar(desc: str):
    """A Trainer callback: one tqdm bar per training run with the latest loss (instead of a
    printed dict per step). Built on call, so importing this module does not import transformers."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class LossBar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=desc, unit="step", leave=False)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return LossBar()


class _FiniteLossGuard:
    """Stops training at the first NaN / inf loss (checked at every logged step)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Guard(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                loss = (logs or {}).get("loss")
                if loss is not None and not math.isfinite(loss):
                    raise TrainingError(
                        f"the training loss became {loss} at optimiser step {state.global_step}; lower the "
                        "learning rate or check the data. The last finished step is kept."
                    )

        return Guard()


def causal_lm_collator(tokenizer):
    """Pads a batch of ``input_ids`` + ``labels`` (the same ids: the model shifts them). Only the
    padding it adds is masked out of the loss (-100), so an EOS token, which is also the pad token of
    many tokenizers, stays a training target (padding by token id would mask every EOS)."""
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return DataCollatorForSeq2Seq(tokenizer=tokenizer, label_pad_token_id=-100, return_tensors="pt")


def train(
    model: nn.Module,
    samples: list[list[int]],
    tokenizer,
    config: TrainConfig,
    *,
    seed: int,
    device: str = "cpu",
    desc: str = "train",
) -> dict:
    """Train the model's trainable parameters on ``samples`` with a fresh optimiser and schedule."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if not samples:
        raise DataError("no training samples for this step")
    dataset = Dataset.from_dict({"input_ids": samples, "labels": samples})
    collator = causal_lm_collator(tokenizer)
    with tempfile.TemporaryDirectory(prefix="losa-train-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio of the total steps
            lr_scheduler_type=config.lr_scheduler,
            max_grad_norm=config.max_grad_norm,
            num_train_epochs=config.epochs,
            optim=_optimizer_name(config, device),
            logging_steps=1,
            logging_nan_inf_filter=False,  # the Trainer would log a NaN / inf loss as the running mean: the guard must see it
            save_strategy="no",
            report_to="none",
            seed=seed,
            data_seed=seed,
            use_cpu=not device.startswith("cuda"),
            dataloader_pin_memory=False,
            remove_unused_columns=False,
            ddp_find_unused_parameters=False,  # every adapter factor is used in every forward
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=[_FiniteLossGuard(), _loss_bar(desc)])
        for noisy in (ProgressCallback, PrinterCallback):  # their per-step dict printing is replaced by _loss_bar
            trainer.remove_callback(noisy)
        start, cpu_start = time.perf_counter(), time.process_time()
        model.train()
        with PeakMemory(device) as peak:
            trainer.train()
        model.eval()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:  # the last update diverged after the last logged loss
        raise TrainingError(
            f"training diverged: {len(bad)} trainable tensors hold NaN / inf (e.g. {bad[0]}); lower the learning "
            "rate or check the data. The last finished step is kept."
        )
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "loss": losses,
        "final_loss": losses[-1] if losses else None,
        "optimizer": args.optim if isinstance(args.optim, str) else args.optim.value,
        "optimizer_steps": trainer.state.global_step,
        "samples": len(samples),
        "tokens": sum(len(s) for s in samples),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # process CPU time: the load of other jobs does not inflate it
        "peak_memory_mib": peak.mib,  # CPU: peak resident set while training; CUDA: peak allocated
    }

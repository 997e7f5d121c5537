"""One LoRA training step of a small LLaMA: PEFT LoRA vs our masked one-matmul adapter vs the authors' form.

Every linear layer of attention and MLP (q, k, v, o, gate, up, down) is adapted at the same rank
(8, alpha 16) on a model whose base weights were pruned to 50 % with Wanda scores. Variants:

  peft     peft.get_peft_model LoRA (unmasked: y = x W^T + s drop(x) A^T B^T)
  ours     losa.adapters.MaskedLoraLinear (one matmul with W + s (B A) ⊙ M; two-path with dropout)
  authors  the authors' form: base matmul + a second matmul with the dense masked delta, inside
           torch.utils.checkpoint as in their peft/tuners/lora/layer.py
  authors-plain  the same without the checkpoint (optional, --variants)

A step is forward + backward + AdamW step on random tokens. Time: one process per dropout value
builds every variant and interleaves their steps (rotating the order), so that load from other
processes on shared CPUs hits all variants alike; medians of --steps steps after --warmup steps,
as wall time and as process CPU time (with --threads 1 the CPU time does not count time spent
descheduled, which makes it the robust measure on a loaded machine; the ratios use it then).
Memory: a fresh process per (variant, dropout), so that peaks do not mix.
Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU
the process's peak resident set (VmHWM), reset through /proc/self/clear_refs just before the first
step, with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_) so that every large
tensor is its own mapping and returns to the OS when freed: the peak then tracks the live tensor
bytes instead of malloc's cached heap. "train peak" is that peak minus the memory held before the
first step (model and adapters): activations, temporaries, gradients, optimiser state.

--shrink-study instead trains rank-8 adapters on a synthetic next-token task and measures the loss
after shrinking them to lower ranks with "keep" (leading rows, paper) and "svd" (best rank-r).

Example: python benchmarks/bench_adapter_step.py --write benchmarks/results/adapter_step.md
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _markdown import write_section  # noqa: E402

RESULTS_HEADER = "# Adapter training step\n\nWritten by `benchmarks/bench_adapter_step.py`; one section per configuration.\n"

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("peft", "ours", "authors", "authors-plain")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# model set-up


def build_sparse_llama(args) -> LlamaForCausalLM:
    """Random LLaMA whose attention/MLP linears are pruned to --sparsity with Wanda scores."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128),
    )
    model = LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype))
    wanda_prune(model, args.sparsity, calibration_tokens(args, seed=1))
    return model


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS}


@torch.no_grad()
def wanda_prune(model: nn.Module, sparsity: float, input_ids: torch.Tensor) -> None:
    """Per output row, zero the `sparsity` fraction of weights with the lowest |W_ij| * ||X_j||.

    One-shot on the dense model's activations (not block-sequential): the benchmark only needs a
    realistic unstructured 50 % pattern.
    """
    linears = target_linears(model)
    sq_norms = {name: torch.zeros(m.in_features, device=m.weight.device) for name, m in linears.items()}

    def accumulate(name):
        def hook(module, inputs, output):  # returns None: the output is left as it is
            sq_norms[name] += inputs[0].float().reshape(-1, module.in_features).square().sum(0)
        return hook

    hooks = [module.register_forward_hook(accumulate(name)) for name, module in linears.items()]
    model(input_ids)
    for hook in hooks:
        hook.remove()
    for name, module in linears.items():
        score = module.weight.abs().float() * sq_norms[name].sqrt()
        pruned = score.argsort(dim=1)[:, : int(module.in_features * sparsity)]
        module.weight.scatter_(1, pruned, 0.0)


def calibration_tokens(args, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(args.device)


class AuthorsMaskedLora(nn.Module):
    """The authors' form: base(x) + s * drop(x) ((B A) ⊙ (W != 0))^T, the second term checkpointed."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, use_checkpoint: bool = True):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = alpha / rank
        self.use_checkpoint = use_checkpoint

    @staticmethod
    def masked_delta_path(x, lora_A, lora_B, weight, scale):
        masked = (lora_B @ lora_A) * (weight != 0)
        return (x @ masked.t().to(x.dtype)) * scale

    def forward(self, x):
        result = self.base(x)
        args = (self.dropout(x), self.lora_A, self.lora_B, self.base.weight, self.scale)
        if self.use_checkpoint:
            return result + checkpoint(self.masked_delta_path, *args, use_reentrant=False)
        return result + self.masked_delta_path(*args)


def add_adapters(model: nn.Module, variant: str, args, dropout: float) -> nn.Module:
    """Adapt every attention/MLP linear at rank --rank; everything else frozen."""
    if variant == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=dropout,
                            target_modules=list(PROJECTIONS), bias="none")
        return get_peft_model(model, config)
    if variant == "ours":
        from losa.adapters import inject_adapters

        inject_adapters(model, {name: args.rank for name in target_linears(model)}, args.alpha, dropout)
        return model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, linear in target_linears(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child,
                AuthorsMaskedLora(linear, args.rank, args.alpha, dropout, use_checkpoint=variant == "authors"))
    return model


# ----------------------------------------------------------------------------------------------
# one measured run (in its own process)


def resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1))


def new_run(args, variant: str, dropout: float):
    """An adapted model in train mode and a fresh AdamW over its trainable parameters."""
    model = add_adapters(build_sparse_llama(args), variant, args, dropout)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.001)


def train_step(model, optimiser, input_ids, cuda: bool) -> tuple[float, float, float]:
    """One forward + backward + AdamW step: (wall seconds, process CPU seconds, loss)."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, loss.item()


def time_worker(args, dropout: float) -> list[dict]:
    """Every variant in this process, steps interleaved (variant order rotated each step) so that
    load from other processes hits all variants alike; medians after the warm-up steps."""
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    runs = {variant: new_run(args, variant, dropout) for variant in args.variants}
    input_ids = calibration_tokens(args, seed=2)
    walls, cpus, first_loss = {v: [] for v in runs}, {v: [] for v in runs}, {}
    order = list(runs)
    for index in range(args.warmup + args.steps):
        for variant in order:
            wall, cpu, loss = train_step(*runs[variant], input_ids, cuda)
            first_loss.setdefault(variant, loss)
            if index >= args.warmup:
                walls[variant].append(wall)
                cpus[variant].append(cpu)
        order = order[1:] + order[:1]
    return [{"variant": v, "dropout": dropout, "step_s": statistics.median(walls[v]),
             "cpu_s": statistics.median(cpus[v]), "steps_ms": [round(t * 1e3) for t in walls[v]],
             "first_loss": first_loss[v], "trainable": sum(p.numel() for p in runs[v][1].param_groups[0]["params"])}
            for v in runs]


def memory_worker(args, variant: str, dropout: float) -> dict:
    """Peak memory of two training steps of one variant, relative to what is held before them."""
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model, optimiser = new_run(args, variant, dropout)
    input_ids = calibration_tokens(args, seed=2)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset the peak resident set (VmHWM) to the current one
        held = resident_kib("VmRSS") * 1024
    for _ in range(2):  # the first step also allocates the optimiser state
        train_step(model, optimiser, input_ids, cuda)
    peak = torch.cuda.max_memory_allocated() if cuda else resident_kib("VmHWM") * 1024
    return {"held_bytes": held, "peak_bytes": peak, "train_bytes": peak - held}


def spawn(args, *worker: str, env_extra: dict | None = None):
    """Run `--worker ...` in a fresh interpreter and return its JSON answer."""
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO_ROOT, "src"), **(env_extra or {}))
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", *worker]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"worker {' '.join(worker)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args) -> list[dict]:
    """Time (one process per dropout) and memory (one process per variant and dropout).

    Memory runs fix glibc's mmap threshold (module docstring); that makes every large allocation a
    fresh mapping with page faults, which would distort timings, hence separate processes.
    """
    results = []
    for dropout in args.dropouts:
        for row in spawn(args, "time", str(dropout)):
            row.update(spawn(args, "memory", str(dropout), row["variant"],
                             env_extra={"MALLOC_MMAP_THRESHOLD_": "65536"} if args.device == "cpu" else None))
            print(f"dropout {dropout:g} {row['variant']:13s} {row['step_s'] * 1e3:8.1f} ms wall "
                  f"{row['cpu_s'] * 1e3:8.1f} ms CPU  train peak {mib(row['train_bytes'])} MiB  "
                  f"total {mib(row['peak_bytes'])} MiB  first loss {row['first_loss']:.4f}", file=sys.stderr)
            results.append(row)
    return results


# ----------------------------------------------------------------------------------------------
# report


def machine_description(args) -> str:
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = re.search(r"model name\s*:\s*(.*)", cpuinfo.read()).group(1)
    except (OSError, AttributeError):
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs visible, torch {torch.__version__} "
            f"with {args.threads} thread(s), {platform.system()} {platform.release()}")


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def results_table(results: list[dict], cpu_time: bool) -> str:
    time_key = "cpu_s" if cpu_time else "step_s"
    header = ("| dropout | variant | step wall (ms) | step CPU (ms) | train peak (MiB) | total peak (MiB) "
              "| trainable | time / PEFT | time / authors | train peak / PEFT | total peak / PEFT |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for dropout in sorted({r["dropout"] for r in results}):
        group = {r["variant"]: r for r in results if r["dropout"] == dropout}
        peft, authors = group.get("peft"), group.get("authors")
        for variant, r in group.items():
            ratio = lambda key, ref: f"{r[key] / ref[key]:.2f}" if ref else "-"
            rows.append(
                f"| {dropout:g} | {variant} | {r['step_s'] * 1e3:.0f} | {r['cpu_s'] * 1e3:.0f} | "
                f"{mib(r['train_bytes'])} | {mib(r['peak_bytes'])} | {r['trainable']:,} | "
                f"{ratio(time_key, peft)} | {ratio(time_key, authors)} | {ratio('train_bytes', peft)} | "
                f"{ratio('peak_bytes', peft)} |"
            )
    return header + "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------------------------
# rank shrink study: "keep" vs "svd"


def markov_batch(transitions: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """Token sequences from a fixed first-order Markov chain (a learnable synthetic language)."""
    tokens = torch.empty(batch, seq, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, transitions.shape[0], (batch,), generator=generator)
    for position in range(1, seq):
        tokens[:, position] = torch.multinomial(transitions[tokens[:, position - 1]], 1, generator=generator)[:, 0]
    return tokens


def shrink_study(args) -> str:
    """Train rank-8 masked adapters, then shrink with keep / svd; loss right after and after recovery."""
    import copy

    from losa.adapters import adapter_layers, inject_adapters, set_ranks

    torch.set_num_threads(args.threads)
    # A small fixed set-up, so that a few hundred CPU steps learn the synthetic language.
    study = argparse.Namespace(**{**vars(args), "device": "cpu", "dtype": "float32", "hidden": 128,
                                  "intermediate": 344, "layers": 2, "heads": 4, "vocab": 256, "seq": 64,
                                  "batch": 16})
    generator = torch.Generator().manual_seed(0)
    transitions = torch.softmax(torch.randn(study.vocab, study.vocab, generator=generator) * 3.0, dim=1)
    model = build_sparse_llama(study)
    inject_adapters(model, {name: 8 for name in target_linears(model)}, study.alpha, dropout=0.0)
    evaluation = markov_batch(transitions, 8, study.seq, torch.Generator().manual_seed(99))

    def train(model, steps):
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.study_lr,
                                      weight_decay=0.001)
        model.train()
        for _ in range(steps):
            batch = markov_batch(transitions, study.batch, study.seq, generator)
            model(input_ids=batch, labels=batch).loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)

    @torch.no_grad()
    def loss(model):
        model.eval()
        return model(input_ids=evaluation, labels=evaluation).loss.item()

    before_training = loss(model)
    train(model, args.study_steps)
    trained = loss(model)
    lines = [f"Synthetic Markov-chain LM (vocab {study.vocab}), hidden {study.hidden}, {study.layers} layers, "
             f"50 % Wanda; rank-8 adapters trained {args.study_steps} steps (lr {args.study_lr}): eval loss "
             f"{before_training:.4f} -> {trained:.4f}. Then every adapter shrunk to rank r; loss right after, and "
             f"after {args.study_recovery} more steps (fresh AdamW):", "",
             "| r | method | loss after shrink | loss after recovery |", "|---|---|---|---|"]
    for rank in args.study_ranks:
        for method in ("keep", "svd"):
            shrunk = copy.deepcopy(model)
            set_ranks(shrunk, {name: rank for name in adapter_layers(shrunk)}, method)
            after = loss(shrunk)
            train(shrunk, args.study_recovery)
            lines.append(f"| {rank} | {method} | {after:.4f} | {loss(shrunk):.4f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["peft", "ours", "authors"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the base model (adapters stay float32)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--write", metavar="PATH", help="write the report as a section of the markdown file PATH "
                        "(a rerun with the same --title replaces its section, other sections stay)")
    parser.add_argument("--title", help="section title (default: from the model shape, dtype and dropouts)")
    parser.add_argument("--shrink-study", action="store_true", help="run the keep-vs-svd shrink study instead")
    parser.add_argument("--study-steps", type=int, default=150)
    parser.add_argument("--study-recovery", type=int, default=20)
    parser.add_argument("--study-lr", type=float, default=2e-3)
    parser.add_argument("--study-ranks", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        kind, dropout = args.worker[0], float(args.worker[1])
        answer = time_worker(args, dropout) if kind == "time" else memory_worker(args, args.worker[2], dropout)
        print(json.dumps(answer))
        return
    if args.shrink_study:
        title = args.title or "Rank shrink: keep vs svd"
        report = f"## {title}\n\n" + shrink_study(args)
        command = "python benchmarks/bench_adapter_step.py " + " ".join(sys.argv[1:])
        report += f"\nCommand: `{command}`\n"
        print(report)
        if args.write:
            write_section(Path(args.write), title, report, RESULTS_HEADER)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda was asked for but torch sees no CUDA device")
    cpu_time = args.device == "cpu" and args.threads == 1
    load_before = os.getloadavg()
    results = measure(args)
    load_after = os.getloadavg()
    first_losses = sorted({round(r["first_loss"], 4) for r in results if r["dropout"] == 0})
    steps = "; ".join(f"{r['variant']} p={r['dropout']:g}: {r['steps_ms']}" for r in results)
    command = "python benchmarks/bench_adapter_step.py " + " ".join(sys.argv[1:])
    title = args.title or (
        f"One adapter training step, hidden {args.hidden}, {args.dtype}, dropout "
        + " / ".join(f"{p:g}" for p in args.dropouts) + ": PEFT LoRA vs masked one-matmul adapter vs authors' form"
    )
    report = (
        f"## {title}\n\n"
        f"Command: `{command}`\n\nMachine: {machine_description(args)}\n\n"
        f"Model: LLaMA hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"{args.heads} heads, vocab {args.vocab}, {args.dtype}; batch {args.batch} x seq {args.seq}; "
        f"q/k/v/o/gate/up/down adapted at rank {args.rank}, alpha {args.alpha:g}; base weights "
        f"{args.sparsity:.0%} sparse (Wanda scores). Step = forward + backward + AdamW. Medians of "
        f"{args.steps} steps after {args.warmup} warm-up, the variants' steps interleaved in one process. "
        f"Time ratios use {'process CPU time (1 thread: insensitive to other load)' if cpu_time else 'wall time'}.\n\n"
        + results_table(results, cpu_time)
        + f"\nWall time of each measured step (ms): {steps}.\n\n"
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.1f}' for v in load_before)}; after: "
        f"{', '.join(f'{v:.1f}' for v in load_after)}.\n"
        f"First-step loss with dropout 0, all variants: {first_losses} (adapters start as no-ops, so a "
        "single value means every variant computes the same model).\n"
    )
    print(report)
    if args.write:
        write_section(Path(args.write), title, report, RESULTS_HEADER)


if __name__ == "__main__":
    main()

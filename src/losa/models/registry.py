"""The registry of supported decoder architectures.

Everything the rest of losa needs to know about a model family is one ``Architecture`` entry:
where the decoder blocks are and which linear layers inside a block are prunable / adaptable.
The blocks' inputs are reached generically (during one forward every block's ``forward`` is
replaced by a recorder that keeps exactly the arguments the installed transformers version passes
it: hidden states, masks, position ids, rotary embeddings), and a block is run by calling it with
its own captured arguments, so no entry needs version-specific calling code.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from losa.errors import ModelError


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]  # values of config.model_type
    blocks_path: str  # attribute path from the *ForCausalLM model to the ModuleList of blocks
    linear_names: tuple[str, ...]  # prunable nn.Linear layers, relative to a block, in execution order

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The prunable linear layers of one block, by name relative to the block.

        Adapter wrappers (``losa.adapters``) expose the wrapped layer as ``.base``; pruning and
        statistics always act on the plain ``nn.Linear``.
        """
        found = {}
        for name in self.linear_names:
            module = block.get_submodule(name)
            found[name] = getattr(module, "base", module)
        return found

    def linear_module_names(self, model: nn.Module) -> list[str]:
        """Full module names (as in ``model.named_modules()``) of every prunable linear layer."""
        return [
            f"{self.blocks_path}.{i}.{name}"
            for i in range(len(self.blocks(model)))
            for name in self.linear_names
        ]


_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

ARCHITECTURES: tuple[Architecture, ...] = (
    # LLaMA-1/2/3 and Vicuna share the LLaMA implementation.
    Architecture("llama", ("llama",), "model.layers", _LLAMA_LINEARS),
    Architecture("mistral", ("mistral",), "model.layers", _LLAMA_LINEARS),
    Architecture("qwen2", ("qwen2",), "model.layers", _LLAMA_LINEARS),
    Architecture(
        "opt",
        ("opt",),
        "model.decoder.layers",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    ),
)


def supported_model_types() -> list[str]:
    return [t for arch in ARCHITECTURES for t in arch.model_types]


def architecture_for_type(model_type: str) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise ModelError(
        f"unsupported model type {model_type!r}: losa supports {', '.join(supported_model_types())}. "
        "Add an Architecture entry to losa/models/registry.py to support another decoder family."
    )


def architecture_of(model: nn.Module) -> Architecture:
    """The registry entry of a loaded Hugging Face causal LM (PEFT wrappers are looked through)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError(f"{type(model).__name__} has no Hugging Face config; pass a *ForCausalLM model")
    return architecture_for_type(config.model_type)

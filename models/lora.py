"""LoRA adapters (PEFT folders) at compile time: merged into the weights, or served from slots.

An adapter is data, never code: `adapter_config.json` is read as JSON and the weights from
`adapter_model.safetensors` (a pickle, `adapter_model.bin`, is refused). Every check runs
before anything is merged, and each refusal is one line naming the feature:

- `peft_type` must be LORA; `r`, `lora_alpha` positive numbers;
- refused: DoRA (`use_dora`), `modules_to_save`, trained biases (`bias` other than none,
  `lora_bias`), per-module ranks or alphas (`rank_pattern`, `alpha_pattern`), `layer_replication`,
  `target_parameters`, `trainable_token_indices`, QA-LoRA, and initialisations that change the
  base weights (PiSSA, OLoRA, CorDA, LoftQ: their adapter only fits the changed base);
- the weights: only `lora_A` / `lora_B` of modules that are `nn.Linear` (or transformers'
  `Conv1D` under `fan_in_fan_out`); embeddings' `lora_embedding_*`, DoRA magnitudes, any other
  tensor, a module the model lacks, or shapes that do not fit the module are refused.

Merging (`merge_adapter`) is PEFT's `merge_and_unload`: W' = W + scale * (B @ A), with scale =
lora_alpha / r, or lora_alpha / sqrt(r) under `use_rslora` (transposed for fan_in_fan_out).

Slots (`LoRASlots`) wrap each targeted linear so that its output gains
(x @ A[adapter_index]) @ B[adapter_index] per batch row, with the stacked A [slots, in, rank]
and B [slots, rank, out] as buffers (graph initializers, named `lora.{module}.A` / `.B`) and
`adapter_index` int64 [batch] a graph input. The runtime fills the stacks from PEFT folders when
it opens the artifact (kiln.runtime.lora); slot 0 stays zero, the base model. The scale is
folded into B by the runtime.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from kiln.runtime.lora import Adapter, LoRAError
from kiln.runtime.lora import read_adapter as _read



def read_adapter(folder: str | Path, name: str | None = None) -> Adapter:
    """kiln.runtime.lora.read_adapter (the checks are the runtime's), weights as torch tensors."""
    adapter = _read(folder, name)
    weights = {m: (torch.from_numpy(a.copy()), torch.from_numpy(b.copy())) for m, (a, b) in adapter.weights.items()}
    return dataclasses.replace(adapter, weights=weights)


def _linear(model: torch.nn.Module, module: str, where: str) -> tuple[torch.nn.Module, int, int, bool]:
    """The module at `module` in `model`: (module, in_features, out_features, transposed weight)."""
    try:
        target = model.get_submodule(module)
    except AttributeError:
        raise LoRAError(f"{where}: the adapter adapts {module}, which the model does not have (an adapter for "
                        f"another model?)") from None
    if isinstance(target, torch.nn.Linear):
        return target, target.in_features, target.out_features, False
    if type(target).__name__ == "Conv1D" and hasattr(target, "nf"):  # transformers' GPT-2 style: weight [in, out]
        return target, target.weight.shape[0], target.weight.shape[1], True
    raise LoRAError(f"{where}: {module} is a {type(target).__name__}: LoRA on non-Linear modules is not supported")


def check_fits(adapter: Adapter, model: torch.nn.Module) -> None:
    """Every adapted module exists, is linear and has the adapter's shapes."""
    for module, (a, b) in adapter.weights.items():
        target, fan_in, fan_out, transposed = _linear(model, module, str(adapter.path))
        if a.shape[1] != fan_in or b.shape[0] != fan_out:
            raise LoRAError(f"{adapter.path}: the adapter does not fit the model: {module} is {fan_in} -> {fan_out}, "
                            f"the adapter's lora_A {list(a.shape)} and lora_B {list(b.shape)} (an adapter for another "
                            f"model?)")
        if transposed != adapter.fan_in_fan_out:
            raise LoRAError(f"{adapter.path}: fan_in_fan_out={adapter.fan_in_fan_out} but {module} is a "
                            f"{type(target).__name__}: the adapter was made for another module type")
        shared = [n for n, p in model.named_parameters(remove_duplicate=False)
                  if p is target.weight and n != f"{module}.weight"]
        if shared:
            raise LoRAError(f"{adapter.path}: {module}'s weight is tied to {shared[0]}: merging into tied weights is "
                            "not supported")


@torch.no_grad()
def merge_adapter(model: torch.nn.Module, adapter: Adapter) -> None:
    """Merge `adapter` into `model` in place, as PEFT's merge_and_unload does."""
    check_fits(adapter, model)
    for module, (a, b) in adapter.weights.items():
        target = model.get_submodule(module)
        delta = (b @ a) * adapter.scale
        if adapter.fan_in_fan_out:
            delta = delta.T
        target.weight += delta.to(target.weight.dtype)


def lora_source(source, folder: str | Path):
    """`source` with the adapter at `folder` merged into its weights when it loads. The adapter is
    read and checked now (one line on any problem); its shapes are checked against the model
    when it loads. The export cache key includes the adapter's weights."""
    adapter = read_adapter(folder)
    if source.task != "causal-lm" and source.task not in ("embedding", "sequence-classification"):
        raise LoRAError(f"--lora does not apply to a {source.task} model")
    load, fingerprint = source.load, source.fingerprint

    def merged():
        loaded = load()
        model = loaded.reference if loaded.reference is not None else loaded.module
        merge_adapter(model, adapter)
        loaded.meta["lora"] = {"mode": "merged", "adapters": [adapter.record()]}
        return loaded

    def fp() -> str:
        return hashlib.sha256(f"{fingerprint()}+lora:{adapter.sha256}:{adapter.scale}".encode()).hexdigest()

    # the GGUF's own quantized blocks are the unmerged weights: import-source-blocks must not use them
    return dataclasses.replace(source, name=f"{source.name}+{adapter.name}"[:96], fingerprint=fp, load=merged,
                               blocks=None), adapter

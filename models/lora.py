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


# --- slots (multi-LoRA) ------------------------------------------------------------

INDEX_INPUT = "adapter_index"
SLOTS_VERSION = 4  # in the export cache key: the slot modules' graph form


class SlotLinear(torch.nn.Module):
    """`base(x) + (x @ A[i]) @ B[i]` for each batch row b, A [slots, in, rank], B [slots, rank, out].

    While compiling, every row uses slot 1, which holds a seeded random probe adapter: the index is
    a placeholder computed from the batch size, so the graph keeps `input_ids` as its only input
    through the KV-cache pass, every pass check and the parity gate (which runs rows one at a
    time) exercise the LoRA path, and PyTorch computes the same. `bind_slots` then makes the
    index the graph input `adapter_index`."""

    def __init__(self, base: torch.nn.Module, fan_in: int, fan_out: int, slots: int, rank: int):
        super().__init__()
        self.base = base
        self.register_buffer("lora_A", torch.zeros(slots, fan_in, rank))
        self.register_buffer("lora_B", torch.zeros(slots, rank, fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = torch.ones(x.shape[0], dtype=torch.int64, device=x.device)
        # one Gather each (indexing exports as Transpose + GatherND): [batch, in, rank], [batch, rank, out]
        a, b = self.lora_A.index_select(0, index), self.lora_B.index_select(0, index)
        return self.base(x) + torch.matmul(torch.matmul(x, a), b)


def default_targets(model: torch.nn.Module) -> list[str]:
    """The names of every linear layer but the output head: attention and MLP projections."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if m is not head and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")})


def insert_slots(model: torch.nn.Module, slots: int, rank: int, targets: list[str] | None, seed: int = 0) -> list[dict]:
    """Wrap every targeted linear of `model` in a SlotLinear with `slots` + 1 slots (0: the base).
    Slots 1.. hold a seeded random probe adapter while compiling, so every pass check exercises
    the LoRA path; the compiler zeroes them before writing. Returns the module records."""
    wanted = targets or default_targets(model)
    records = []
    gen = torch.Generator().manual_seed(seed)
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in wanted or not name:
            continue
        target, fan_in, fan_out, _ = _linear(model, name, "--lora-targets")
        slot = SlotLinear(target, fan_in, fan_out, slots + 1, rank)
        with torch.no_grad():
            slot.lora_A[1:] = torch.randn(slots, fan_in, rank, generator=gen) / fan_in ** 0.5
            slot.lora_B[1:] = torch.randn(slots, rank, fan_out, generator=gen) * (0.2 / rank ** 0.5)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, slot)
        records.append({"name": name, "in": fan_in, "out": fan_out})
    missing = sorted(set(wanted) - {r["name"].rsplit(".", 1)[-1] for r in records})
    if missing:
        raise LoRAError(f"--lora-targets: the model has no linear layer named {missing[0]} "
                        f"(its linear layers: {', '.join(default_targets(model)) or 'none'})")
    return records


def slots_source(source, slots: int, rank: int, targets: list[str] | None):
    """`source` compiled with `slots` swappable LoRA adapters of rank <= `rank` (docs/lora.md)."""
    if not isinstance(slots, int) or slots < 1 or slots > 64:
        raise LoRAError(f"--lora-slots must be between 1 and 64, not {slots}")
    if not isinstance(rank, int) or rank < 1 or rank > 1024:
        raise LoRAError(f"--lora-rank must be between 1 and 1024, not {rank}")
    if source.task != "causal-lm":
        raise LoRAError(f"--lora-slots serves causal LMs; this model's task is {source.task} (merge one adapter "
                        "with --lora instead)")
    load, fingerprint = source.load, source.fingerprint

    def slotted():
        loaded = load()
        model = loaded.reference
        records = insert_slots(model, slots, rank, targets)  # in place: loaded.module wraps the same model
        loaded.meta["lora"] = {"mode": "slots", "slots": slots, "rank": rank, "index_input": INDEX_INPUT,
                               "modules": records}
        return loaded

    def fp() -> str:
        return hashlib.sha256(f"{fingerprint()}+lora-slots:{SLOTS_VERSION}:{slots}:{rank}:{targets}".encode()).hexdigest()

    tag = f"{slots}x{rank}"
    return dataclasses.replace(source, name=f"{source.name}+lora-slots-{tag}"[:96], fingerprint=fp, load=slotted,
                               blocks=None)


def slot_initializers(model, record: dict) -> dict:
    """The record with each module's stacked A and B initializer names in the exported graph
    (torch.export names a buffer by its module path)."""
    names = list(model.graph.initializers)
    modules = []
    for m in record["modules"]:
        found = {}
        for part in ("A", "B"):
            suffix = f"{m['name']}.lora_{part}"
            hits = [n for n in names if n == suffix or n.endswith("." + suffix)]
            if len(hits) != 1:
                raise LoRAError(f"the exported graph has {len(hits)} initializers for {suffix} (expected one)")
            found[part.lower()] = hits[0]
        modules.append({**m, **found})
    return {**record, "modules": modules}


def bind_slots(model, record: dict) -> dict:
    """After the passes: zero every slot (the probe adapters were for the pass checks), and make
    the stacks' Gather indices (the compile-time placeholder: slot 1 for every row) the graph
    input `adapter_index` int64 [batch]. The record gains the stacks' dtype. A pass that rewrote a
    stack is a kiln bug, said in one line."""
    import numpy as np
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph = model.graph
    batch = graph.inputs[0].shape[0] if graph.inputs and graph.inputs[0].shape else "batch"
    index = ir.Value(name=record["index_input"], type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([batch]))
    dtype = None
    for m in record["modules"]:
        for part in ("a", "b"):
            value = graph.initializers.get(m[part])
            gathers = [u.node for u in value.uses()] if value is not None else []
            if value is None or value.const_value is None or not gathers or any(
                    n.op_type != "Gather" or n.attributes.get_int("axis", 0) != 0 or n.inputs[0] is not value
                    for n in gathers):
                raise LoRAError(f"the LoRA slot tensor {m[part]} did not survive the passes as the data of a Gather "
                                "(a pass rewrote it); nothing was written")
            value.const_value = ir.tensor(np.zeros_like(value.const_value.numpy()), name=m[part])
            dtype = value.const_value.dtype.name.lower()
            for node in gathers:
                node.replace_input_with(1, index)
    graph.inputs.append(index)
    RemoveUnusedNodesPass()(model)
    return {**record, "dtype": dtype}

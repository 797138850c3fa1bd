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
import math
import re
from pathlib import Path
from typing import Any

import torch

from kiln.errors import KilnError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

# adapter_config.json keys kiln reads or that change nothing at inference (dropout, how it was trained)
_INERT = {"r", "lora_alpha", "target_modules", "use_rslora", "fan_in_fan_out", "peft_type", "task_type",
          "base_model_name_or_path", "revision", "inference_mode", "init_lora_weights", "lora_dropout",
          "auto_mapping", "peft_version", "bias", "layers_to_transform", "layers_pattern", "exclude_modules",
          "megatron_config", "megatron_core", "qalora_group_size", "ensure_weight_tying", "loftq_config",
          "eva_config", "runtime_config", "lora_ga_config", "corda_config"}
# features kiln refuses when set, with the words of the error line
_REFUSED = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (fully trained modules)",
    "lora_bias": "trained LoRA biases (lora_bias)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable_token_indices",
    "use_qalora": "QA-LoRA (use_qalora)",
}
# initialisations that rewrite the base weights: the saved adapter only fits that rewritten base
_BASE_CHANGING_INIT = ("pissa", "olora", "corda", "loftq")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


class LoRAError(KilnError):
    pass


@dataclasses.dataclass
class Adapter:
    """A checked PEFT LoRA adapter: per module path, A [r, in] and B [out, r] (fp32)."""

    name: str
    path: Path
    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A, B)
    sha256: str

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    @property
    def targets(self) -> list[str]:
        """The module names it adapts (the last part of each path), sorted."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.weights})

    def record(self) -> dict:
        return {"name": self.name, "r": self.r, "alpha": self.alpha, "use_rslora": self.rslora,
                "scale": self.scale, "targets": self.targets, "modules": len(self.weights), "sha256": self.sha256}


def _truthy(value: Any) -> bool:
    return value not in (None, False, "none", "", 0) and value != {} and value != []


def read_adapter(folder: str | Path, name: str | None = None) -> Adapter:
    """Read and check a PEFT LoRA folder (see the module docstring for what is refused)."""
    from kiln.models.local import check_safetensors, read_json

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise LoRAError(f"{folder}: no such LoRA adapter folder (a PEFT folder: {CONFIG} and {WEIGHTS})")
    config_file, weights_file = folder / CONFIG, folder / WEIGHTS
    if not config_file.is_file():
        raise LoRAError(f"{folder}: no {CONFIG} (a PEFT LoRA adapter folder holds {CONFIG} and {WEIGHTS})")
    config = read_json(config_file, "the adapter config")
    if not isinstance(config, dict):
        raise LoRAError(f"{config_file}: not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{config_file}: a {config.get('peft_type')} adapter is not supported (kiln merges LORA)")
    for key, feature in _REFUSED.items():
        if _truthy(config.get(key)):
            raise LoRAError(f"{config_file}: {feature} is not supported: kiln merges plain LoRA (A, B) on linear layers")
    if config.get("bias", "none") != "none":
        raise LoRAError(f"{config_file}: trained biases (bias={config['bias']!r}) are not supported: kiln merges "
                        "plain LoRA (A, B) on linear layers")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INIT):
        raise LoRAError(f"{config_file}: init_lora_weights={init!r} is not supported: it changes the base weights, so "
                        "the adapter fits only that changed base (convert it to plain LoRA with PEFT first)")
    unknown = sorted(k for k, v in config.items() if k not in _INERT and k not in _REFUSED and _truthy(v))
    if unknown:
        raise LoRAError(f"{config_file}: {unknown[0]} is not supported (kiln does not know what it changes)")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise LoRAError(f"{config_file}: r must be a positive integer, not {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise LoRAError(f"{config_file}: lora_alpha must be a positive number, not {alpha!r}")
    if not weights_file.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise LoRAError(f"{folder}: the adapter weights are a pickle (adapter_model.bin), which can run code when "
                            f"loaded; save the adapter as safetensors ({WEIGHTS})")
        raise LoRAError(f"{folder}: no {WEIGHTS}")
    check_safetensors(weights_file)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoRAError(f"{weights_file}: cannot read the adapter weights: {exc}") from exc
    stray = sorted((_feature_of(k), k) for k in tensors if _KEY.match(k) is None)
    if stray:  # the most telling feature first (embeddings also save their base weights, for example)
        feature, key = stray[0]
        raise LoRAError(f"{weights_file}: {feature[2:]} is not supported: kiln merges plain LoRA (A, B) on linear "
                        f"layers (tensor {key})")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        parts.setdefault(m["module"], {})[m["part"]] = tensor.detach().to(torch.float32)
    if not parts:
        raise LoRAError(f"{weights_file}: the adapter holds no LoRA weights")
    weights = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise LoRAError(f"{weights_file}: {module} has {', '.join(ab)} but not both lora_A and lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise LoRAError(f"{weights_file}: {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not "
                            f"of rank r={r} (adapter_config.json)")
        weights[module] = (a, b)
    digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    return Adapter(name or _adapter_name(folder), folder, r, float(alpha), bool(config.get("use_rslora")),
                   bool(config.get("fan_in_fan_out")), weights, digest)


def _adapter_name(folder: Path) -> str:
    name = folder.resolve().name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64] or "adapter"


def _feature_of(key: str) -> str:
    """What a tensor that is not a LoRA A/B weight is, prefixed with its priority for the error line."""
    if "lora_magnitude_vector" in key:
        return "0 DoRA (lora_magnitude_vector)"
    if "lora_embedding" in key:
        return "1 LoRA on embeddings (lora_embedding_A/B)"
    if ".lora_B.bias" in key or ".lora_A.bias" in key:
        return "2 trained LoRA biases"
    if "modules_to_save" in key or not key.startswith("base_model.model."):
        return "3 a fully trained module (modules_to_save)"
    return "4 a tensor that is not a lora_A/lora_B weight"


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

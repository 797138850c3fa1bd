"""LoRA adapters for the runtime: a PEFT folder read with numpy alone, and the slot tables of an
artifact compiled with `kiln compile --lora-slots N` (docs/lora.md).

An adapter is data, never code: `adapter_config.json` is read as JSON and the weights from
`adapter_model.safetensors` by a small reader of the format (no `safetensors` package, no
torch); a pickle, `adapter_model.bin`, is refused. Every check runs before anything is used,
each refusal one line naming the feature:

- `peft_type` must be LORA; `r`, `lora_alpha` positive numbers;
- refused: DoRA (`use_dora`), `modules_to_save`, trained biases (`bias` other than none,
  `lora_bias`), per-module ranks or alphas (`rank_pattern`, `alpha_pattern`), `layer_replication`,
  `target_parameters`, `trainable_token_indices`, QA-LoRA, any other non-default key kiln does not
  know, and initialisations that change the base weights (PiSSA, OLoRA, CorDA, LoftQ: their
  adapter only fits the changed base);
- the weights: only `lora_A` / `lora_B` weights; embeddings' `lora_embedding_*`, DoRA magnitudes
  or any other tensor are refused. (The compiler also checks each module against the model.)

The compiler (kiln.models.lora) merges the same `Adapter`; the runtime fills slots with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

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
    """A checked PEFT LoRA adapter: per module path, A [r, in] and B [out, r] (float32)."""

    name: str
    path: Path
    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    weights: dict[str, tuple[np.ndarray, np.ndarray]]  # module -> (A, B)
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
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise LoRAError(f"{folder}: no such LoRA adapter folder (a PEFT folder: {CONFIG} and {WEIGHTS})")
    config_file, weights_file = folder / CONFIG, folder / WEIGHTS
    if not config_file.is_file():
        raise LoRAError(f"{folder}: no {CONFIG} (a PEFT LoRA adapter folder holds {CONFIG} and {WEIGHTS})")
    config = _read_json(config_file)
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
    tensors = read_safetensors(weights_file)
    stray = sorted((_feature_of(k), k) for k in tensors if _KEY.match(k) is None)
    if stray:  # the most telling feature first (embeddings also save their base weights, for example)
        feature, key = stray[0]
        raise LoRAError(f"{weights_file}: {feature[2:]} is not supported: kiln merges plain LoRA (A, B) on linear "
                        f"layers (tensor {key})")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        parts.setdefault(m["module"], {})[m["part"]] = tensor
    if not parts:
        raise LoRAError(f"{weights_file}: the adapter holds no LoRA weights")
    weights = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise LoRAError(f"{weights_file}: {module} has {', '.join(ab)} but not both lora_A and lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
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




def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise LoRAError(f"{path}: cannot read the adapter config: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise LoRAError(f"{path}: the adapter config is not valid JSON ({exc.msg} at line {exc.lineno})") from exc


_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": "bf16"}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 (F32, F16, BF16, F64), checked: the header
    parses, offsets lie inside the file, and the file is as long as the header says."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LoRAError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(data) < 8:
        raise LoRAError(f"{path}: not a safetensors file (shorter than its header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100 << 20:
        raise LoRAError(f"{path}: truncated or not a safetensors file (header of {n} bytes)")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoRAError(f"{path}: corrupt safetensors header") from exc
    if not isinstance(header, dict):
        raise LoRAError(f"{path}: corrupt safetensors header")
    body, out, end = memoryview(data)[8 + n:], {}, 0
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = spec["dtype"], [int(d) for d in spec["shape"]], spec["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise LoRAError(f"{path}: corrupt safetensors header (tensor {name})") from exc
        if dtype not in _DTYPES:
            raise LoRAError(f"{path}: tensor {name} has dtype {dtype}; adapters are read as F32, F16, BF16 or F64")
        size = 2 if dtype in ("F16", "BF16") else 8 if dtype == "F64" else 4
        if not (0 <= lo <= hi <= len(body)) or hi - lo != size * math.prod(shape):
            raise LoRAError(f"{path}: truncated safetensors file (tensor {name} lies outside it)")
        raw = body[lo:hi]
        if dtype == "BF16":
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"))
        out[name] = array.astype(np.float32).reshape(shape)
        end = max(end, hi)
    if not out:
        raise LoRAError(f"{path}: the safetensors file holds no tensors")
    if end != len(body):
        raise LoRAError(f"{path}: truncated safetensors file ({len(data)} bytes, its header describes {8 + n + end})")
    return out


def slot_tensors(record: dict, adapters: dict[str, str | Path], where: str) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """The LoRA slots of an artifact (manifest `lora`, mode `slots`) filled with `adapters` (name ->
    PEFT folder), in order from slot 1: (name -> slot, initializer name -> stacked tensor). Slot 0
    and unused slots stay zero. Each adapter's A goes in as Aᵀ [in, r] and its B as scale·Bᵀ
    [r, out], zero-padded to the compiled rank."""
    slots, rank = int(record["slots"]), int(record["rank"])
    if len(adapters) > slots:
        raise LoRAError(f"{where}: {len(adapters)} adapters for {slots} LoRA slots (compiled with --lora-slots {slots})")
    dtype = np.float16 if record.get("dtype") == "float16" else np.float32
    modules = {m["name"]: m for m in record["modules"]}
    tensors = {}
    for m in record["modules"]:
        tensors[m["a"]] = np.zeros((slots + 1, m["in"], rank), dtype=dtype)
        tensors[m["b"]] = np.zeros((slots + 1, rank, m["out"]), dtype=dtype)
    names: dict[str, int] = {}
    for slot, (name, folder) in enumerate(adapters.items(), start=1):
        adapter = read_adapter(folder, name)
        if adapter.r > rank:
            raise LoRAError(f"{adapter.path}: rank {adapter.r} is above the artifact's LoRA rank {rank} "
                            f"(compile with --lora-rank {adapter.r} or more)")
        for module, (a, b) in adapter.weights.items():
            m = modules.get(module)
            if m is None:
                raise LoRAError(f"{adapter.path}: the adapter adapts {module}, which the artifact's LoRA slots do not "
                                f"cover (compiled for {', '.join(sorted({n.rsplit('.', 1)[-1] for n in modules}))})")
            if a.shape[1] != m["in"] or b.shape[0] != m["out"]:
                raise LoRAError(f"{adapter.path}: the adapter does not fit the model: {module} is {m['in']} -> "
                                f"{m['out']}, the adapter's lora_A {list(a.shape)} and lora_B {list(b.shape)}")
            tensors[m["a"]][slot, :, :adapter.r] = a.T
            tensors[m["b"]][slot, :adapter.r, :] = adapter.scale * b.T
        names[name] = slot
    return names, tensors

"""Export to ONNX through torch.export (`torch.onnx.export(..., dynamo=True)`), cached.

The export is unoptimized (`optimize=False`): folding and cleanup are kiln passes, so
their effect is measured and recorded. Exported graphs are cached under
$KILN_CACHE/exports/<name>-<key>, where the key hashes the source weights, the torch and
transformers versions and this module's EXPORT_VERSION; a hit skips loading the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kiln.errors import KilnError
from kiln.models.cache import atomic_dir, cache_dir
from kiln.models.sources import Loaded, Source, quiet_third_party

EXPORT_VERSION = "3"  # 2: reference outputs for the parity gate, max_positions and attention windows in meta;
# 3: max_positions of RoBERTa-style position tables (padding_idx + 1 fewer)


class ExportError(KilnError):
    pass


@dataclasses.dataclass
class Prepared:
    """An exported model on disk plus what the manifest needs to know about it."""

    path: Path  # model.onnx
    meta: dict[str, Any]
    tokenizer: Path | None
    reference: Path | None = None  # reference.npz: the source model's outputs on the parity gate's inputs

    @property
    def task(self) -> str:
        return self.meta.get("task", "custom")


def export_loaded(loaded: Loaded, out_dir: Path) -> float:
    """Export `loaded.module` to out_dir/model.onnx (+ model.onnx.data). Returns seconds."""
    start = time.perf_counter()
    quiet_third_party()
    module = loaded.module.eval()
    names = list(loaded.example_inputs)
    output_names = list(getattr(module, "output_names", None) or [])
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args=(),
                kwargs=loaded.example_inputs,
                dynamo=True,
                optimize=False,
                input_names=names,
                dynamic_shapes=loaded.dynamic_shapes,
                verbose=False,
            )
        _name_outputs(program.model, output_names)
        program.save(str(out_dir / "model.onnx"), external_data=True)
    except Exception as exc:
        # torch.onnx wraps the real failure; its own first line is generic.
        root = exc.__cause__ or exc
        msg = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
        raise ExportError(f"torch.export to ONNX failed: {type(root).__name__}: {msg}") from exc
    return time.perf_counter() - start


def _name_outputs(model, names: list[str]) -> None:
    """Give the graph outputs their contract names.

    Done here rather than with export's `output_names`, which can clash with an internal
    value of the same name (BERT's `embeddings` module yields a value named 'embedding').
    """
    if not names:
        return
    taken = {v.name: v for n in model.graph for v in n.outputs}
    taken.update({v.name: v for v in model.graph.inputs})
    for value, name in zip(model.graph.outputs, names):
        other = taken.get(name)
        if other is not None and other is not value:
            other.name = f"{name}_internal"
        value.name = name


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "export": EXPORT_VERSION}


def prepare(source: Source, *, progress: bool = True, console=None) -> Prepared:
    """Fetch, load and export `source`, or take the cached export."""
    source.fetch(progress=progress)
    fingerprint = source.fingerprint()
    key = hashlib.sha256(json.dumps({"fp": fingerprint, **_versions()}, sort_keys=True).encode()).hexdigest()[:16]
    final = cache_dir("exports") / f"{source.name}-{key}"
    if not (final / "meta.json").is_file():
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True, disable=not progress) as bar:
            task = bar.add_task(f"loading {source.name}", total=2)
            loaded = source.load()
            bar.update(task, advance=1, description=f"exporting {source.name} (torch.export → ONNX)")
            with atomic_dir(final) as tmp:
                write_export(loaded, tmp, {"source": source.name, "description": source.description,
                                           "sha256": fingerprint})
            bar.advance(task)
    return read_export(final)


def write_export(loaded: Loaded, directory: Path, meta: dict) -> None:
    """model.onnx, meta.json, tokenizer.json and the reference outputs of `loaded` into `directory`."""
    seconds = export_loaded(loaded, directory)
    meta = {**meta, **loaded.meta, "export_seconds": round(seconds, 1), "versions": _versions()}
    if loaded.tokenizer_json is not None:
        (directory / "tokenizer.json").write_text(loaded.tokenizer_json)
    if loaded.reference is not None:
        np.savez(directory / "reference.npz", **reference_outputs(loaded, meta))
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))


def read_export(directory: Path) -> Prepared:
    meta = json.loads((directory / "meta.json").read_text())
    tok, ref = directory / "tokenizer.json", directory / "reference.npz"
    return Prepared(directory / "model.onnx", meta, tok if tok.is_file() else None, ref if ref.is_file() else None)


GATE_PADDING = 5  # slots of padding in the gate's second row


def gate_inputs(meta: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """The parity gate's inputs: batch 2, the second row padded (left for a causal LM, as its
    runtime pads; right for encoders), longer than any attention window the config declares."""
    rng = np.random.default_rng(seed)
    vocab = int(meta.get("vocab_size") or 2)
    limit = meta.get("max_positions") or meta.get("max_sequence_length") or 4096
    if meta.get("task") == "causal-lm":
        length = min(limit, max(32, max(meta.get("attention_windows") or [0]) + 16))
    else:
        length = min(meta.get("max_sequence_length") or limit, 24)
    ids = rng.integers(0, vocab, size=(2, length)).astype(np.int64)
    mask = np.ones_like(ids)
    if meta.get("task") == "causal-lm":
        mask[1, :GATE_PADDING] = 0
        pad = (meta.get("generation") or {}).get("pad_token_id")
        ids[1, :GATE_PADDING] = pad if pad is not None else 0
    else:
        mask[1, -GATE_PADDING:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def reference_outputs(loaded: Loaded, meta: dict) -> dict[str, np.ndarray]:
    """The source model's outputs on `gate_inputs`, computed in PyTorch (fp32)."""
    feeds = gate_inputs(meta)
    ids, mask = (torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        if meta.get("task") == "causal-lm":
            model = loaded.reference
            kwargs = {"attention_mask": mask, "use_cache": False}
            if "position_ids" in inspect.signature(model.forward).parameters:
                kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
            out = model(input_ids=ids, **kwargs).logits
        else:
            extra = {"token_type_ids": torch.zeros_like(ids)} if "token_type_ids" in loaded.example_inputs else {}
            out = loaded.module(input_ids=ids, attention_mask=mask, **extra)
    return {**feeds, "output": out.float().numpy()}


SAMPLE_TEXT = ("The committee met on Tuesday to discuss the new budget. Most members agreed that the roads "
               "needed repair before winter, but they could not agree on how to pay for it. ")


def _numpy_dtype(name: str) -> np.dtype | None:
    """An input's dtype as kiln.ir.summary names it (ONNX's names: "float" is float32) or as numpy does."""
    onnx_type = ir.DataType.__members__.get(name.upper())
    if onnx_type is not None:
        return np.dtype(onnx_type.numpy())
    try:
        return np.dtype(name)
    except TypeError:
        return None


def sample_inputs(meta: dict, signature: list[dict], seed: int = 0, tokenizer: Path | None = None) -> dict[str, np.ndarray]:
    """Fixed inputs for the pipeline's numeric checks: batch 2, sequence 12 for dynamic axes, or
    longer than the longest attention window the model declares (so every pass is checked
    where a window changes the attention).

    Token ids are real text when a tokenizer is given (lossy passes are judged on the
    distributions a model produces on language, not on random ids), else drawn below the
    vocab size; masks pad the tail of the second row so the masking path is exercised;
    token type ids and unknown integer inputs are zeros.
    """
    rng = np.random.default_rng(seed)
    vocab = int(meta.get("vocab_size") or 2)
    text_ids = None
    if tokenizer is not None:
        from tokenizers import Tokenizer

        text_ids = Tokenizer.from_file(str(tokenizer)).encode(SAMPLE_TEXT).ids
    length = max(12, max(meta.get("attention_windows") or [0]) + 8)
    feeds: dict[str, np.ndarray] = {}
    for spec in signature:
        shape = [d if isinstance(d, int) else (2 if i == 0 else length) for i, d in enumerate(spec["shape"] or [])]
        dtype = _numpy_dtype(spec["dtype"])
        name = spec["name"]
        if dtype is not None and dtype.kind == "i":
            if "mask" in name:
                arr = np.ones(shape, dtype=np.int64)
                if arr.ndim == 2 and arr.shape[0] > 1 and arr.shape[1] > 4:
                    arr[1, -4:] = 0
            elif name == "input_ids":
                arr = rng.integers(0, vocab, size=shape)
                if text_ids is not None and len(text_ids) >= arr.shape[-1] + arr.shape[0] * 5:
                    for row in range(arr.shape[0]):  # different slices of the text per row
                        arr[row] = text_ids[row * 5: row * 5 + arr.shape[-1]]
            else:
                arr = np.zeros(shape, dtype=np.int64)
            feeds[name] = arr.astype(dtype)
        elif dtype is not None and dtype.kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is not None and dtype.kind == "b":
            feeds[name] = np.ones(shape, dtype=bool)
        else:
            raise ExportError(f"cannot make a sample for input '{name}' of dtype {spec['dtype']}")
    return feeds

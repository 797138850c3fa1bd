"""Loading and saving models, with errors a user can read."""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir


class ModelLoadError(ValueError):
    pass


def load_model(path: str | os.PathLike, *, load_external: bool = True) -> ir.Model:
    """Load an ONNX file; external data is read into memory so the model is self-contained."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such ONNX file")
    try:
        model = ir.load(path)
        if load_external:
            ir.external_data.load_to_model(model)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: not a valid ONNX model ({reason})") from exc
    return model


def save_model(model: ir.Model, path: str | os.PathLike) -> None:
    """Save with all weights in one external file beside the model (`<name>.data`)."""
    path = Path(path)
    ir.save(model, path, external_data=path.name + ".data")


def to_bytes(model: ir.Model) -> bytes:
    """Serialized ModelProto (weights inline), e.g. for an in-memory ORT session."""
    return ir.to_proto(model).SerializeToString()

"""Loading and saving models, with errors a user can read."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from kiln.errors import KilnError


class ModelLoadError(KilnError, ValueError):
    """A file that is not a loadable ONNX model: one `error:` line (a KilnError), as any bad input."""


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


# Numpy can hold these (ORT takes them as OrtValues over numpy arrays); int4, bfloat16, float8 stay inline.
_NUMPY_DTYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8, ir.DataType.UINT8,
                 ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64, ir.DataType.BOOL}
IN_MEMORY = "kiln-in-memory"  # the location of a weight that is handed over beside the proto


def without_weights(model: ir.Model, min_bytes: int = 1 << 20) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The ModelProto with its large weights left out (external-data placeholders at a location
    nothing reads) and those weights as arrays, for a consumer that takes them in memory (ORT's
    `add_external_initializers`) or does not need them (the checker). Copying the weights into
    the proto and serializing them cost SmolLM2 (540 MB) about 3 s per check."""
    swapped = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.dtype not in _NUMPY_DTYPES or tensor.nbytes < min_bytes:
            continue
        swapped.append((value, tensor))
        value.const_value = ir.ExternalTensor(IN_MEMORY, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                              name=value.name)
    try:
        proto = ir.to_proto(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
    return proto, {value.name: tensor.numpy() for value, tensor in swapped}

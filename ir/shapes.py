"""Shape and dtype helpers over onnx_ir values."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass


def dims(value: ir.Value | None) -> tuple[int | str | None, ...] | None:
    """The value's shape as ints (static), strings (symbolic) or None (unknown); None for no shape."""
    if value is None or value.shape is None:
        return None
    out: list[int | str | None] = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        elif isinstance(d, ir.SymbolicDim):
            out.append(d.value)
        else:
            out.append(None)
    return tuple(out)


def is_static(value: ir.Value) -> bool:
    shape = dims(value)
    return shape is not None and all(isinstance(d, int) for d in shape)


def infer_shapes(model: ir.Model) -> ir.Model:
    """Run ONNX shape/dtype inference and merge the results into the model, in place."""
    return ShapeInferencePass()(model).model

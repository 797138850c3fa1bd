"""Static summary of a model: op histogram, parameter count and bytes by dtype."""

from __future__ import annotations

import collections
import dataclasses

import onnx_ir as ir


@dataclasses.dataclass
class Summary:
    ops: dict[str, int]
    nodes: int
    parameters: int
    bytes_by_dtype: dict[str, int]
    inputs: list[dict]
    outputs: list[dict]

    @property
    def parameter_bytes(self) -> int:
        return sum(self.bytes_by_dtype.values())

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"parameter_bytes": self.parameter_bytes}


def _signature(values) -> list[dict]:
    return [
        {
            "name": v.name,
            "dtype": v.dtype.name.lower() if v.dtype is not None else None,
            "shape": [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape else None,
        }
        for v in values
    ]


def _packed_values(node: ir.Node) -> dict[ir.Value, int]:
    """Initializers of ORT's packed low-bit ops, with the number of values each holds (its byte
    count is not it: two 4-bit values share a byte)."""
    if node.domain != "com.microsoft" or not node.inputs:
        return {}
    if node.op_type == "MatMulNBits" and len(node.inputs) > 1 and node.inputs[1] is not None:
        n, k, block = (node.attributes.get_int(a, 0) for a in ("N", "K", "block_size"))
        out = {node.inputs[1]: n * k}
        zero = node.inputs[3] if len(node.inputs) > 3 else None
        if zero is not None and zero.dtype == ir.DataType.UINT8 and block:
            out[zero] = n * -(-k // block)
        return out
    data = node.inputs[0]
    if node.op_type == "GatherBlockQuantized" and data is not None and data.const_value is not None \
            and data.dtype == ir.DataType.UINT8:
        return {data: data.const_value.size * 8 // node.attributes.get_int("bits", 4)}
    return {}


def summary(model: ir.Model) -> Summary:
    """Count ops (including those in subgraphs) and parameters: the values the initializers hold
    (packed 4-bit weights count two per byte; quantization scales count too)."""
    ops: collections.Counter[str] = collections.Counter()
    packed: dict[ir.Value, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        domain = node.domain if node.domain not in ("", "ai.onnx") else ""
        ops[f"{domain}::{node.op_type}" if domain else node.op_type] += 1
        packed.update(_packed_values(node))
    parameters = 0
    by_dtype: collections.Counter[str] = collections.Counter()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        parameters += packed.get(value) or tensor.size
        by_dtype[tensor.dtype.name.lower()] += tensor.nbytes
    return Summary(
        ops=dict(ops.most_common()),
        nodes=sum(ops.values()),
        parameters=parameters,
        bytes_by_dtype=dict(by_dtype.most_common()),
        inputs=_signature(model.graph.inputs),
        outputs=_signature(model.graph.outputs),
    )

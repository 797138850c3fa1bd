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


def summary(model: ir.Model) -> Summary:
    """Count ops (including those in subgraphs) and parameters (initializers)."""
    ops: collections.Counter[str] = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        domain = node.domain if node.domain not in ("", "ai.onnx") else ""
        ops[f"{domain}::{node.op_type}" if domain else node.op_type] += 1
    parameters = 0
    by_dtype: collections.Counter[str] = collections.Counter()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        parameters += tensor.size
        by_dtype[tensor.dtype.name.lower()] += tensor.nbytes
    return Summary(
        ops=dict(ops.most_common()),
        nodes=sum(ops.values()),
        parameters=parameters,
        bytes_by_dtype=dict(by_dtype.most_common()),
        inputs=_signature(model.graph.inputs),
        outputs=_signature(model.graph.outputs),
    )

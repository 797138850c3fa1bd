"""Fix symbolic input dims to constants, then fold the shape arithmetic that becomes constant.

Before:  input_ids[batch, sequence]  attention_mask[batch, total_sequence]
         past_key_values.{i}.key[batch, Hkv, past_sequence, Dh]
         ... Shape(x) -> Gather -> Concat -> Reshape chains over those dims ...
After:   input_ids[1, 128]  attention_mask[1, 128 + P]  past_key_values.{i}.key[1, Hkv, P, Dh]
         the shape chains folded into constant initializers (fold-constants)

Parameters (the names of kiln's symbolic dims):
    batch          B, default 1
    sequence       S, the tokens per call, default 128 (1 for a decode step)
    past_sequence  P, the length of a growing KV cache before the call, default 0;
                   `total_sequence` becomes P + S. A static cache (insert-kv-cache with
                   `static_length`) already has a fixed length and needs no P.

Every value annotated with a dim that the inputs carry gets the constant; any other
symbolic annotation is dropped (shape inference in the folder recomputes it), because it
may be stale: a static cache's internal values say `total_sequence` for its fixed length,
and the folder would otherwise fold shape arithmetic from the wrong number. Then kiln's
fold-constants runs with shape inference.

Stats: dims_fixed (input dims set), nodes_folded. An input dim with another name is an error
naming it; so is a size below 1 (0 for past_sequence).
Preconditions: inputs annotated with kiln's dim names (exports and insert-kv-cache use them).
In a pipeline the sample inputs must already have the fixed shapes (outputs are compared
with the previous stage). Exact.
Not handled: dims with other names (error); data-dependent shapes (NonZero, ...) stay dynamic.
"""

from __future__ import annotations

import onnx_ir as ir

from kiln.errors import KilnError
from kiln.ir import dims
from kiln.passes.base import KilnPass, count_nodes, fingerprint
from kiln.passes.fold_constants import FoldConstantsPass
from kiln.passes.registry import register_pass


class SpecializeShapesError(KilnError):
    pass


@register_pass("specialize-shapes")
class SpecializeShapesPass(KilnPass):
    def __init__(self, batch: int = 1, sequence: int = 128, past_sequence: int = 0):
        super().__init__()
        if batch < 1 or sequence < 1 or past_sequence < 0:
            raise ValueError("batch and sequence must be >= 1, past_sequence >= 0")
        self.batch = batch
        self.sequence = sequence
        self.past_sequence = past_sequence

    @property
    def fixed(self) -> dict[str, int]:
        return {"batch": self.batch, "sequence": self.sequence, "past_sequence": self.past_sequence,
                "total_sequence": self.past_sequence + self.sequence}

    def call(self, model: ir.Model):
        before, nodes = fingerprint(model), count_nodes(model)
        fixed = self.fixed
        for value in model.graph.inputs:
            for dim in dims(value) or ():
                if not isinstance(dim, int):
                    if dim not in fixed:
                        raise SpecializeShapesError(
                            f"specialize-shapes: input '{value.name}' has a symbolic dim '{dim}' "
                            f"that it does not fix (it fixes {', '.join(fixed)})")
        on_inputs = {d for v in model.graph.inputs for d in dims(v) or () if isinstance(d, str)}
        dims_fixed = sum(isinstance(d, str) for v in model.graph.inputs for d in dims(v) or ())
        for value in _values(model.graph):
            shape = dims(value)
            if shape is None or all(isinstance(d, int) for d in shape):
                continue
            if all(isinstance(d, int) or d in on_inputs for d in shape):
                value.shape = ir.Shape([fixed[d] if isinstance(d, str) else d for d in shape])
            else:
                value.shape = None
        FoldConstantsPass()(model)
        stats = {"dims_fixed": dims_fixed, "nodes_folded": nodes - count_nodes(model)}
        return self.result(model, modified=fingerprint(model) != before or dims_fixed > 0, stats=stats)


def _values(graph: ir.Graph):
    yield from graph.inputs
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs

"""Store a weight that is read through a Transpose already transposed.

    y = MatMul(x, Transpose(W[V, H]))          (a tied LM head: W is also the embedding table)
    e = Gather(W, ids[...], axis=0)
  ->
    y = MatMul(x, Wt[H, V])                    Wt = Wᵀ, a constant
    e = Transpose(Gather(Wt, ids, axis=1), perm=[1, .., r, 0])     r = rank(ids)

A backend that takes the weights as run-time parameters (TVM: they are the compiled
function's inputs, so nothing folds them) otherwise transposes the whole table on every call:
SmolLM2's tied 49152 × 576 table cost TVM's prefill 104 ms of 475. The gathered rows are read
from the transposed table (one value per row of Wt) and transposed back, so the table is
stored once. Exact (the same values, moved).

Preconditions: a 2-D constant W and a Transpose with perm [1, 0]. W's other readers must all be
Gathers on axis 0, else Wᵀ is stored beside W. Not handled: transposes of computed tensors
(a dequantized table), higher ranks.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kiln.ir.values import new_initializer
from kiln.passes.base import KilnPass
from kiln.passes.registry import register_pass


@register_pass("transpose-weights")
class TransposeWeightsPass(KilnPass):
    def call(self, model: ir.Model):
        graph = model.graph
        stored = gathers = 0
        for node in list(graph):
            if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
                continue
            w = node.inputs[0]
            if w.const_value is None or len(w.shape or ()) != 2 or list(node.attributes.get_ints("perm", [1, 0])) != [1, 0]:
                continue
            wt = new_initializer(graph, f"{w.name}.transposed", w.const_value.numpy().T)
            node.outputs[0].replace_all_uses_with(wt, replace_graph_outputs=True)
            stored += 1
            for use in list(w.uses()):
                gather = use.node
                if gather is node or gather.op_type != "Gather" or use.idx != 0 or gather.attributes.get_int("axis", 0):
                    continue
                ids = gather.inputs[1]
                if ids.shape is None:
                    continue
                rank = len(ids.shape)
                rows = ir.node("Gather", [wt, ids], attributes={"axis": 1}, num_outputs=1)
                back = ir.node("Transpose", rows.outputs, attributes={"perm": [*range(1, rank + 1), 0]}, num_outputs=1)
                rows.outputs[0].dtype = back.outputs[0].dtype = w.dtype
                rows.outputs[0].shape = ir.Shape([w.shape[1], *ids.shape])
                back.outputs[0].shape = ir.Shape([*ids.shape, w.shape[1]])
                graph.insert_before(gather, [rows, back])
                gather.outputs[0].replace_all_uses_with(back.outputs[0], replace_graph_outputs=True)
                gathers += 1
        if stored:
            RemoveUnusedNodesPass()(model)
        return self.result(model, modified=stored > 0, stats={"weights_transposed": stored, "gathers_rewritten": gathers})

"""Pack MatMuls that read the same activation into one wider MatMul.

    y1 = MatMul(A, W1[K, N1]);  y2 = MatMul(A, W2[K, N2]);  ...
  ->
    y = MatMul(A, Concat(W1, W2, ...)[K, N1 + N2 + ...]);  y1, y2, ... = Split(y, [N1, N2, ...], axis=-1)

Typical groups: the Q, K and V projections of an attention layer, and the gate and up
projections of a gated MLP. One wide GEMM instead of several narrow ones halves the
kernel launches and lets the threads share one pass over A; for weight-only quantization
it also means one MatMulNBits per group.

When every MatMul of a group is followed by an Add of a constant bias b_i [N_i] (Qwen2's Q/K/V),
the biases pack too: Split(Add(MatMul(A, Wcat), Concat(b1, b2, ...))), which leaves the packed
projection whole for consumers that take it packed (GroupQueryAttention, `pack-attention-qkv`).

Dims: A[..., K]; every W constant, 2-D, same K and dtype. Exact (the same dot products).
Not handled: weights read through a Transpose (a tied LM head stands alone anyway),
MatMuls on different activations, weights that are not constants.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kiln.passes.base import KilnPass
from kiln.passes.registry import register_pass


def _bias(node: ir.Node) -> tuple[ir.Node, np.ndarray] | None:
    """(Add, bias) when the MatMul's only reader adds a constant [N] bias."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    other = add.inputs[1 - uses[0].idx]
    width = node.inputs[1].const_value.shape[1]
    if other is None or other.const_value is None or tuple(other.const_value.shape) != (width,):
        return None
    return add, other.const_value.numpy()


def _packable(node: ir.Node, a: ir.Value) -> bool:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.inputs[0] is not a:
        return False
    w = node.inputs[1]
    return w is not None and w.const_value is not None and len(w.const_value.shape) == 2


@register_pass("pack-matmuls")
class PackMatMulsPass(KilnPass):
    def __init__(self, min_group: int = 2):
        super().__init__()
        if min_group < 2:
            raise ValueError("min_group must be at least 2")
        self.min_group = min_group

    def call(self, model: ir.Model):
        graph = model.graph
        order = {node: i for i, node in enumerate(graph)}
        # Graph order, so the packed graph is the same on every run.
        activations = list(dict.fromkeys(n.inputs[0] for n in graph if n.op_type == "MatMul" and n.inputs[0] is not None))
        groups = packed = 0
        for a in activations:
            by_kind: dict[tuple, list[ir.Node]] = {}
            for use in a.uses():
                node = use.node
                if use.idx == 0 and _packable(node, a):
                    w = node.inputs[1].const_value
                    by_kind.setdefault((w.shape[0], w.dtype), []).append(node)
            for nodes in by_kind.values():
                if len(nodes) < self.min_group:
                    continue
                nodes.sort(key=order.__getitem__)
                weights = [n.inputs[1].const_value.numpy() for n in nodes]
                widths = [w.shape[1] for w in weights]
                wide = ir.val(f"{nodes[0].inputs[1].name}.packed{len(nodes)}", const_value=ir.tensor(np.concatenate(weights, axis=1)))
                graph.register_initializer(wide)
                matmul = ir.node("MatMul", [a, wide], num_outputs=1)
                sizes = ir.val(f"{wide.name}.split", const_value=ir.tensor(np.array(widths, dtype=np.int64)))
                graph.register_initializer(sizes)
                biases = [_bias(n) for n in nodes]
                new_nodes = [matmul]
                if all(b is not None for b in biases):
                    bias = ir.val(f"{wide.name}.bias", const_value=ir.tensor(np.concatenate([b for _, b in biases])))
                    graph.register_initializer(bias)
                    new_nodes.append(ir.node("Add", [matmul.outputs[0], bias], num_outputs=1))
                    new_nodes[-1].outputs[0].dtype = nodes[0].outputs[0].dtype
                    nodes = [add for add, _ in biases]  # the packed Add's slices replace the Adds' outputs
                split = ir.node("Split", [new_nodes[-1].outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(nodes))
                graph.insert_before(min(nodes, key=order.__getitem__), [*new_nodes, split])
                matmul.outputs[0].dtype = nodes[0].outputs[0].dtype
                for node, piece in zip(nodes, split.outputs):
                    old = node.outputs[0]
                    piece.dtype, piece.shape = old.dtype, old.shape
                    if old.is_graph_output():  # the I/O signature keeps its names
                        name, old.name = old.name, f"{old.name}.unpacked"
                        piece.name = name
                    old.replace_all_uses_with(piece, replace_graph_outputs=True)
                groups += 1
                packed += len(nodes)
        if groups:
            RemoveUnusedNodesPass()(model)
        return self.result(model, modified=groups > 0, stats={"groups": groups, "matmuls_packed": packed})

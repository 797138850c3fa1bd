"""Linear layers: a MatMul with a constant 2-D weight W[K, N] (not through a Transpose), and
the bias Add right after it. Found from the graph, never from names."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from kiln.ir.values import is_const


def weight_of(node: ir.Node) -> np.ndarray | None:
    """W[K, N] of a MatMul whose second input is a constant 2-D initializer (not through a Transpose)."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    w = node.inputs[1]
    if w is None or w.const_value is None or len(w.const_value.shape) != 2 or node.inputs[0] is None:
        return None
    if is_const(node.inputs[0]):
        return None
    return w.const_value.numpy()


def bias_of(node: ir.Node) -> tuple[ir.Node, int] | None:
    """The Add(MatMul output, const bias[N]) right after a linear layer: (add node, bias input index)."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    other = 1 - uses[0].idx
    b = add.inputs[other]
    w = weight_of(node)
    if b is None or b.const_value is None or w is None or tuple(b.const_value.shape) != (w.shape[1],):
        return None
    return add, other


def linear_output(node: ir.Node) -> ir.Value:
    """The linear layer's output after its bias (if any)."""
    bias = bias_of(node)
    return bias[0].outputs[0] if bias else node.outputs[0]


def linear_layers(model: ir.Model, include_outputs: bool = False) -> list[ir.Node]:
    return [n for n in model.graph if weight_of(n) is not None
            and (include_outputs or not any(o.is_graph_output() for o in n.outputs))]


@dataclasses.dataclass
class WeightRead:
    """One way a constant 2-D weight is read: `node` takes it as input `index`."""

    node: ir.Node
    index: int
    kind: str  # "matmul" (as W[K, N] or through a Transpose of [N, K]) or "gather" (a table [V, H])
    transposed: bool  # stored [N, K]: read through a Transpose, or a Gather table
    matmuls: list[ir.Node]  # the MatMuls that multiply by it (none for a Gather)

    @property
    def head(self) -> bool:
        return any(is_lm_head(m) for m in self.matmuls)


def weight_reads(value: ir.Value) -> list[WeightRead] | str:
    """Every read of `value` as MatMul(A, W), MatMul(A, Transpose(W)) or Gather(W, ids) along axis
    0, or the reason (a line naming the value) when it is read in any other way."""
    reads = []
    for use in value.uses():
        node, index = use.node, use.idx
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and index == 1:
            reads.append(WeightRead(node, 1, "matmul", False, [node]))
        elif node.op_type == "Transpose" and list(node.attributes.get_ints("perm", [1, 0])) == [1, 0]:
            readers = list(node.outputs[0].uses())
            if not readers or any(u.node.op_type != "MatMul" or u.idx != 1 for u in readers):
                return f"{value.name}: read through a Transpose by something other than MatMul"
            reads.append(WeightRead(node, 0, "matmul", True, [u.node for u in readers]))
        elif node.op_type == "Gather" and index == 0 and node.attributes.get_int("axis", 0) == 0:
            reads.append(WeightRead(node, 0, "gather", True, []))
        else:
            return f"{value.name}: read by {node.op_type} (input {index}); left in float"
    return reads


def is_lm_head(node: ir.Node) -> bool:
    """A MatMul whose output is a graph output, directly or as part of a split table's logits
    (Concat, then Gather along the last axis: see split-table-rows)."""
    out = node.outputs[0]
    if out.is_graph_output():
        return True
    for use in out.uses():
        if use.node.op_type == "Concat":
            for g in use.node.outputs[0].uses():
                if g.node.op_type == "Gather" and g.node.attributes.get_int("axis", 0) == -1 \
                        and g.node.outputs[0].is_graph_output():
                    return True
    return False

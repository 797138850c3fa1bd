"""Linear layers: a MatMul with a constant 2-D weight W[K, N] (not through a Transpose), and
the bias Add right after it. Found from the graph, never from names."""

from __future__ import annotations

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

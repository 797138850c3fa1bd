"""MLPs: a down projection whose input is computed channel-wise (elementwise ops only) from
one or more up projections: gate/up for a gated MLP, fc1 + bias for a GELU MLP. `find_mlps`
gives each one's projections, the elementwise region between them, the per-channel constants
inside it and the width, or a reason why a candidate is not an MLP."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from kiln.ir.values import const_array
from kiln.passes.analysis.linear import linear_layers, weight_of

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Sigmoid", "Tanh", "Relu", "Erf", "Gelu", "FastGelu", "Pow", "Neg",
               "Exp", "Sqrt", "Identity", "Cast", "Clip", "Max", "Min", "LeakyRelu", "HardSigmoid", "Softplus",
               "HardSwish", "Abs", "Reciprocal"}


@dataclasses.dataclass
class MLP:
    ups: list[ir.Node]  # MatMuls W[D, I] feeding the channel-wise region
    down: ir.Node  # MatMul W[I, D']
    region: list[ir.Node]  # elementwise nodes between (graph order)
    channel_consts: list[tuple[ir.Node, int]]  # constant [I] inputs inside the region (incl. up biases)
    inter: ir.Value  # the down projection's input [.., I]
    width: int


def _mlp_of(down: ir.Node, order: dict) -> MLP | str:
    w = weight_of(down)
    width = w.shape[0]
    inter = down.inputs[0]
    ups: list[ir.Node] = []
    region: set[ir.Node] = set()
    consts: list[tuple[ir.Node, int]] = []
    stack = [inter]
    seen: set[ir.Value] = set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        p = v.producer()
        if p is None:
            return "reads a graph input"
        uw = weight_of(p)
        if uw is not None:
            if uw.shape[1] != width:
                return f"projection width {uw.shape[1]} != {width}"
            ups.append(p)
            continue
        if p.op_type not in ELEMENTWISE:
            return f"{p.op_type} between the projections"
        region.add(p)
        for i, x in enumerate(p.inputs):
            if x is None:
                continue
            c = const_array(x)
            if c is not None:
                if c.size == 1:
                    continue
                if c.shape[-1:] == (width,) and c.size == width:
                    consts.append((p, i))
                    continue
                return f"constant of shape {c.shape} in the channel-wise region"
            dims = x.shape
            if dims is None or not dims or dims[-1] != width:
                return "a value in the region is not [.., width]"
            stack.append(x)
    if not ups:
        return "no up projection"
    inside = region | {down}
    for n in region | set(ups):
        for o in n.outputs:
            if o.is_graph_output() or any(u.node not in inside for u in o.uses()):
                return "an intermediate value is read outside the MLP"
    return MLP(sorted(ups, key=order.__getitem__), down, sorted(region, key=order.__getitem__), consts, inter, width)


def find_mlps(model: ir.Model) -> tuple[list[MLP], list[str]]:
    order = {n: i for i, n in enumerate(model.graph)}
    mlps, rejected = [], []
    for node in linear_layers(model):
        p = node.inputs[0].producer()
        if p is None or p.op_type not in ELEMENTWISE:
            continue
        found = _mlp_of(node, order)
        if isinstance(found, MLP):
            mlps.append(found)
    return mlps, rejected

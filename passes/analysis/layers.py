"""The residual stream and the decoder layers, found from the graph.

`residual_stream`: the residual Adds `out = skip + f(skip)` in graph order, each skip depending
on the previous sublayer's output. `decoder_layers`: those sublayers grouped into layers, each
starting at an attention sublayer (one whose branch holds a Softmax) and running up to the next.
`exclusive_params`: what removing a set of nodes would save.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from kiln.ir.values import ancestors, depends_on, descendants, is_const


@dataclasses.dataclass
class Sublayer:
    add: ir.Node
    skip: ir.Value  # the stream value entering
    out: ir.Value  # skip + f(skip)
    nodes: set[ir.Node]  # nodes of f (between skip and out)
    attention: bool


@dataclasses.dataclass
class Layer:
    sublayers: list[Sublayer]
    start: ir.Value  # stream value entering the layer
    end: ir.Value | None  # stream value leaving it (None: not known, e.g. last layer of a post-norm model)

    @property
    def nodes(self) -> set[ir.Node]:
        return set().union(*(s.nodes for s in self.sublayers)) | {s.add for s in self.sublayers}


def residual_stream(model: ir.Model) -> list[Sublayer]:
    """The residual Adds `skip + f(skip)` chained in graph order (each skip depends on the previous out)."""
    found: list[Sublayer] = []
    for node in model.graph:
        if node.op_type != "Add" or len(node.inputs) != 2 or any(is_const(i) or i is None for i in node.inputs):
            continue
        a, b = node.inputs
        for skip, branch in ((a, b), (b, a)):
            if len(list(skip.uses())) < 2 or branch.producer() is None:
                continue
            if depends_on(branch, skip):
                nodes = ancestors([branch], stop={skip}) & descendants([skip])
                found.append(Sublayer(node, skip, node.outputs[0], nodes,
                                      any(n.op_type == "Softmax" for n in nodes)))
                break
    # keep the longest chain: each skip must depend on the previous sublayer's output
    chain: list[Sublayer] = []
    for s in found:
        if not chain or s.skip is chain[-1].out or depends_on(s.skip, chain[-1].out, limit=64):
            chain.append(s)
    return chain


def decoder_layers(model: ir.Model) -> list[Layer]:
    """Residual sublayers grouped into layers, each starting at an attention sublayer."""
    stream = residual_stream(model)
    layers: list[list[Sublayer]] = []
    for s in stream:
        if s.attention or not layers:
            layers.append([s])
        else:
            layers[-1].append(s)
    out: list[Layer] = []
    for i, subs in enumerate(layers):
        end = layers[i + 1][0].skip if i + 1 < len(layers) else None
        if end is None and all(stream[k + 1].skip is stream[k].out for k in range(len(stream) - 1)):
            end = subs[-1].out  # pre-norm: the stream is the chain of Adds itself
        out.append(Layer(subs, subs[0].skip, end))
    return out


def exclusive_params(model: ir.Model, nodes: set[ir.Node]) -> int:
    """Elements of initializers read only by `nodes`."""
    total = 0
    for v in model.graph.initializers.values():
        uses = list(v.uses())
        if uses and v.const_value is not None and all(u.node in nodes for u in uses):
            total += v.const_value.size
    return total

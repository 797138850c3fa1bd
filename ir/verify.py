"""Structural verification of an onnx_ir model.

Run by the pipeline after every pass. It checks what a pass can break:

- the ONNX checker accepts the serialized model (custom domains such as
  com.microsoft are not known to the checker and are skipped by it, and so are ORT's
  contrib ops registered in the default domain);
- SSA: every value name is defined once in its scope;
- topological order: a node only reads values defined before it (graph inputs,
  initializers, earlier nodes, or an enclosing graph for subgraphs);
- use lists: `value.uses()` and `node.inputs` agree in both directions;
- no dangling values: every value read is defined in this graph or an enclosing one,
  and every graph output is defined.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from kiln.ir.io import IN_MEMORY, without_weights


class VerificationError(ValueError):
    """The model is structurally invalid; `problems` lists every finding."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        head = problems[0] if problems else "invalid model"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(head + more)


def verify(model: ir.Model, *, checker: bool = True, max_problems: int = 20) -> None:
    """Raise VerificationError if `model` is structurally invalid."""
    problems: list[str] = []
    _verify_graph(model.graph, outer=frozenset(), problems=problems)
    if checker and not problems:
        try:
            proto = _weights_as_inputs(without_weights(model)[0])  # the checker needs no weight data
            _hide_runtime_ops(proto)
            onnx.checker.check_model(proto, full_check=False)
        except Exception as exc:  # the checker raises several exception types
            problems.append(f"onnx checker: {str(exc).strip().splitlines()[0]}")
    if problems:
        raise VerificationError(problems[:max_problems])


def _weights_as_inputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Left-out weights as graph inputs of their type: the checker would look for their file."""
    kept = []
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL and any(
                e.key == "location" and e.value == IN_MEMORY for e in init.external_data):
            proto.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            kept.append(init)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return proto


# ONNX Runtime registers these contrib ops in the default domain; the ONNX checker does
# not know them. They are checked as if they were in a custom domain (which it skips).
RUNTIME_DEFAULT_DOMAIN_OPS = {"SimplifiedLayerNormalization"}


def _hide_runtime_ops(proto: onnx.ModelProto) -> None:
    found = False
    graphs = [proto.graph]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            if node.domain in ("", "ai.onnx") and node.op_type in RUNTIME_DEFAULT_DOMAIN_OPS:
                node.domain = "com.microsoft"
                found = True
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else list(attr.graphs))
    if found and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def _verify_graph(graph: ir.Graph, outer: frozenset[ir.Value], problems: list[str]) -> None:
    defined: set[ir.Value] = set(outer)
    names: dict[str, ir.Value] = {}

    def define(value: ir.Value, where: str) -> None:
        if value.name:
            other = names.get(value.name)
            if other is not None and other is not value:
                problems.append(f"SSA: value '{value.name}' is defined twice ({where})")
            names[value.name] = value
        defined.add(value)

    for value in graph.inputs:
        define(value, "graph input")
    for value in graph.initializers.values():
        define(value, "initializer")

    graph_nodes = set(graph)
    for node in graph:
        label = f"node '{node.name or node.op_type}' ({node.domain or 'ai.onnx'}::{node.op_type})"
        if node.graph is not graph:
            problems.append(f"{label} is listed in a graph it does not belong to")
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            if value not in defined:
                producer = value.producer()
                if producer is not None and producer in graph_nodes:
                    problems.append(
                        f"topological order: {label} reads '{value.name}' before its producer"
                    )
                else:
                    problems.append(f"dangling value: {label} reads undefined '{value.name}'")
            if (node, index) not in {(u.node, u.idx) for u in value.uses()}:
                problems.append(f"use list: '{value.name}' does not list its use by {label}")
        for attr in node.attributes.values():
            for sub in _subgraphs(attr):
                _verify_graph(sub, frozenset(defined), problems)
        for value in node.outputs:
            if value.producer() is not node:
                problems.append(f"use list: output '{value.name}' of {label} names another producer")
            define(value, label)
            for use in value.uses():
                if use.node.inputs[use.idx] is not value:
                    problems.append(
                        f"use list: '{value.name}' lists a stale use by '{use.node.name}'"
                    )
    for value in graph.outputs:
        if value not in defined:
            problems.append(f"dangling value: graph output '{value.name}' is never defined")


def _subgraphs(attr) -> list[ir.Graph]:
    if attr.type == ir.AttributeType.GRAPH:
        return [attr.value]
    if attr.type == ir.AttributeType.GRAPHS:
        return list(attr.value)
    return []

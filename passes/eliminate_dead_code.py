"""Remove nodes, initializers, functions and opset imports that no graph output depends on,
and the optional outputs nothing reads.

    y = A(x); z = B(x)  (z unused)                 ->   y = A(x)
    y, mean, inv_std, s = SkipSimplifiedLayerNormalization(a, b, g)  (mean, inv_std unused)
                                                   ->   y, "", "", s = SkipSimplifiedLayerNormalization(a, b, g)

Wraps onnx_ir's unused-removal passes. Nodes with side effects do not exist in the ops
kiln emits, so any node whose outputs are all unused (transitively) is removed.
onnx_ir clears unused optional outputs of standard ONNX ops only; contrib ops (the fusions'
com.microsoft nodes) are cleared here from ONNX Runtime's schema registry. That is worth
doing: ORT computes and allocates every named output, and SmolLM2's 60 skip-norms spent
about 0.3 ms of a 10 ms decode step on a mean and an inverse deviation nobody reads.
Graph inputs are never removed: the I/O signature is a contract with the runtime.
Exact by construction.
"""

from __future__ import annotations

import functools

import onnx_ir as ir
from onnx_ir.passes.common import (
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from kiln.passes.base import KilnPass, count_nodes
from kiln.passes.registry import register_pass


@functools.cache
def _contrib_optional_outputs() -> dict[tuple[str, str], tuple[bool, ...]]:
    """(domain, op) -> per output, whether ORT's newest schema of the op marks it optional.
    Ops with variadic outputs are left out. Read once: the registry holds about 900 schemas."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    option = C.schemadef.OpSchema.FormalParameterOption
    newest = {}
    for s in C.get_all_operator_schema():
        key = (s.domain, s.name)
        if s.domain not in ("", "ai.onnx") and (key not in newest or s.since_version > newest[key].since_version):
            newest[key] = s
    return {key: tuple(o.option == option.Optional for o in s.outputs) for key, s in newest.items()
            if all(o.option != option.Variadic for o in s.outputs)}


def _drop_unused_contrib_outputs(model: ir.Model) -> int:
    graph_outputs = frozenset(model.graph.outputs)
    dropped = 0
    for node in model.graph:
        if node.domain in ("", "ai.onnx") or len(node.outputs) < 2:
            continue
        optional = _contrib_optional_outputs().get((node.domain, node.op_type))
        if optional is None:
            continue
        for out, is_optional in zip(node.outputs, optional):
            if is_optional and out.name and out not in graph_outputs and not out.uses():
                out.name = ""
                dropped += 1
        keep = len(node.outputs)
        while keep > 1 and not node.outputs[keep - 1].name:
            keep -= 1
        node.resize_outputs(keep)
    return dropped


@register_pass("eliminate-dead-code")
class EliminateDeadCodePass(KilnPass):
    def call(self, model: ir.Model):
        nodes = count_nodes(model)
        inits = len(model.graph.initializers)
        functions = len(model.functions)
        for inner in (RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass()):
            inner(model)
        stats = {
            "nodes_removed": nodes - count_nodes(model),
            "initializers_removed": inits - len(model.graph.initializers),
            "functions_removed": functions - len(model.functions),
            "outputs_dropped": _drop_unused_contrib_outputs(model),
        }
        # Opset-import pruning alone reports modified; only graph changes count here.
        return self.result(model, modified=any(stats.values()), stats=stats)

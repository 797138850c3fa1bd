"""Remove nodes, initializers, functions and opset imports that no graph output depends on.

    y = A(x); z = B(x)  (z unused)   ->   y = A(x)

Wraps onnx_ir's unused-removal passes. Nodes with side effects do not exist in the ops
kiln emits, so any node whose outputs are all unused (transitively) is removed.
Graph inputs are never removed: the I/O signature is a contract with the runtime.
Exact by construction.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import (
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from kiln.passes.base import KilnPass, count_nodes
from kiln.passes.registry import register_pass


@register_pass("eliminate-dead-code")
class EliminateDeadCodePass(KilnPass):
    def call(self, model: ir.Model):
        nodes = count_nodes(model)
        inits = len(model.graph.initializers)
        functions = len(model.functions)
        modified = False
        for inner in (RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass()):
            modified |= inner(model).modified
        stats = {
            "nodes_removed": nodes - count_nodes(model),
            "initializers_removed": inits - len(model.graph.initializers),
            "functions_removed": functions - len(model.functions),
        }
        # Opset-import pruning alone reports modified; only graph changes count here.
        return self.result(model, modified=any(stats.values()), stats=stats)

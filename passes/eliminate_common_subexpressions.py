"""Merge nodes that compute the same thing.

    a = Op(x, y; attrs); b = Op(x, y; attrs)   ->   a = Op(x, y; attrs); uses of b -> a

Wraps onnx_ir's CSE: two nodes are equal when op, domain, attributes and input values
are identical. Also merges identical small constant initializers (≤ `size_limit`
elements), which exporters duplicate per layer (axes, shapes, epsilons), so that the
nodes reading them become equal too.

Exact by construction. Not handled: nodes with subgraph attributes (never merged),
commutative operands in swapped order, large initializers (use dedupe in a backend).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass, DeduplicateInitializersPass

from kiln.passes.base import KilnPass, count_nodes
from kiln.passes.registry import register_pass


@register_pass("eliminate-common-subexpressions")
class EliminateCommonSubexpressionsPass(KilnPass):
    def __init__(self, size_limit: int = 1024):
        super().__init__()
        self.size_limit = size_limit

    def call(self, model: ir.Model):
        nodes = count_nodes(model)
        inits = len(model.graph.initializers)
        DeduplicateInitializersPass(size_limit=self.size_limit)(model)
        CommonSubexpressionEliminationPass(size_limit=self.size_limit)(model)
        stats = {
            "nodes_merged": nodes - count_nodes(model),
            "initializers_merged": inits - len(model.graph.initializers),
        }
        return self.result(model, modified=any(stats.values()), stats=stats)

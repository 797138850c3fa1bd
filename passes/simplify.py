"""Algebraic simplifications with onnxscript's default rewrite rules, plus Identity removal.

    Mul(x, 1) -> x;  Add(x, 0) -> x;  Cast(Cast(x)) -> Cast(x);  Reshape(Reshape(x, s1), s2) -> Reshape(x, s2)
    Slice chains -> one Slice;  Expand / Reshape to the same shape -> x;  Min/Max -> Clip ...
    Identity(x) -> x   (onnx_ir's identity elimination; graph outputs keep their names)

The pattern rules are onnxscript's general-purpose set (the one its `optimize()` uses);
kiln counts how many fired. Exact: each rule preserves values bit for bit, except
where a removed Cast pair round-tripped through a narrower type, which the rules check.
Nodes left dead by a rewrite are removed here so the graph stays tidy.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass, RemoveUnusedNodesPass
from onnxscript import rewriter
from onnxscript.rewriter import pattern

from kiln.passes.base import KilnPass, count_nodes, fingerprint
from kiln.passes.registry import register_pass


@register_pass("simplify")
class SimplifyPass(KilnPass):
    def call(self, model: ir.Model):
        # onnxscript keeps its default rule list private; it is the set optimize() applies.
        before, nodes = fingerprint(model), count_nodes(model)
        rules = pattern.RewriteRuleSet(list(rewriter._DEFAULT_REWRITE_RULES))
        count = rules.apply_to_model(model)
        identities = sum(n.op_type == "Identity" for n in ir.traversal.RecursiveGraphIterator(model.graph))
        IdentityEliminationPass()(model)
        identities -= sum(n.op_type == "Identity" for n in ir.traversal.RecursiveGraphIterator(model.graph))
        RemoveUnusedNodesPass()(model)
        stats = {"rewrites": count, "identities_removed": identities, "nodes_removed": nodes - count_nodes(model)}
        return self.result(model, modified=fingerprint(model) != before, stats=stats)

"""Running onnxscript rewrite rules from kiln passes, with the reasons for non-matches.

Fusion passes are onnxscript pattern/check/rewrite rules. `apply_rules` applies a rule
set and, when some candidates did not fuse, replays the matcher with a tracer to collect
why (the failing check's message), so `kiln compile -v` can say why a layer did not fuse.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchingTracer, MatchStatus


def apply_rules(model: ir.Model, rules: list, *, expected: int | None = None) -> tuple[int, list[str]]:
    """Apply `rules` (RewriteRule objects). Returns (rewrites, reasons).

    Reasons are collected only when fewer than `expected` rewrites happened: the matcher's
    best partial matches on what is left (which can include nodes that were never
    candidates, so they are evidence for a warning, not a list of failures).
    """
    ruleset = pattern.RewriteRuleSet(rules)
    count = ruleset.apply_to_model(model)
    reasons: list[str] = []
    if expected is not None and count < expected:
        tracer = MatchingTracer()
        ruleset.apply_to_model(model, tracer=tracer)
        found = []
        for rule, matches in tracer.best_matches_map.items():
            for match in matches:
                if match.status is MatchStatus.SUCCESS:
                    continue
                why = match.match_result.reason or match.status.name.lower().replace("_", " ")
                node = match.root_node
                # A failed check (the pattern matched, a condition did not hold) explains more
                # than a structural mismatch: list those first.
                found.append((match.status is not MatchStatus.CONDITION_FAILED,
                              f"{rule.name or type(rule).__name__} at {node.op_type} '{node.name}': {why}"))
        reasons = [text for _, text in sorted(found, key=lambda f: f[0])]
    RemoveUnusedNodesPass()(model)
    return count, reasons


def count_ops(model: ir.Model, op_type: str, domain: str = "") -> int:
    return sum(1 for n in ir.traversal.RecursiveGraphIterator(model.graph)
               if n.op_type == op_type and n.domain in ((domain,) if domain else ("", "ai.onnx")))


def one_dequantize_per_reader(graph: ir.Graph) -> int:
    """Give each reader of a shared DequantizeLinear (a tied table: Gather + LM head) its own
    copy, because a rewrite may not swallow a value that something outside the match reads."""
    copies = 0
    for node in list(graph):
        if node.op_type != "DequantizeLinear":
            continue
        for use in list(node.outputs[0].uses())[1:]:
            clone = ir.node("DequantizeLinear", list(node.inputs),
                            attributes={k: a.value for k, a in node.attributes.items()}, num_outputs=1)
            clone.outputs[0].dtype, clone.outputs[0].shape = node.outputs[0].dtype, node.outputs[0].shape
            clone.outputs[0].name = f"{node.outputs[0].name}.{copies}"
            graph.insert_after(node, clone)
            use.node.replace_input_with(use.idx, clone.outputs[0])
            copies += 1
    return copies

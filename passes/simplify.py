"""Algebraic simplifications with onnxscript's default rewrite rules, plus Identity removal.

    Mul(x, 1) -> x;  Add(x, 0) -> x;  Cast(Cast(x)) -> Cast(x);  Reshape(Reshape(x, s1), s2) -> Reshape(x, s2)
    Slice chains -> one Slice;  Expand / Reshape to the same shape -> x;  Min/Max -> Clip ...
    Identity(x) -> x   (onnx_ir's identity elimination; graph outputs keep their names)
    Reshape(Reshape(x, s1), s2) -> x   when s2's result is x's own shape, dims copied (0) included,
                                       e.g. [B, S, H·D] -> [0, 0, H, D] -> [0, 0, -1] (kiln's rule);
                                       a target computed at run time is read from the annotated
                                       result shape (symbolic dims compared by name)

The pattern rules are onnxscript's general-purpose set (the one its `optimize()` uses);
kiln counts how many fired, and sweeps again while a sweep rewrote something (at most 4). Exact: each rule preserves values bit for bit, except
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


class ReshapeRoundTrip(pattern.RewriteRuleClassBase):
    """Reshape(Reshape(x, s1), s2) -> x when the result has x's shape (onnxscript's rule only
    merges the pair, and a shape with copied dims (0) is not known to equal x's)."""

    def pattern(self, op, x, s1, s2):
        inner = op.Reshape(x, s1, _allow_other_attributes=True, _outputs=["inner"])
        return op.Reshape(inner, s2, _allow_other_attributes=True, _outputs=["outer"])

    def check(self, context, x, s1, s2, inner=None, outer=None, **_):
        result = pattern.MatchResult()
        dims = _named(x)
        if dims is None:
            return result.fail("the input's shape is unknown or has an unnamed dim")
        # A target computed at run time (from Shape ops) is read from the annotated result.
        t1, t2 = ir.convenience.get_const_tensor(s1), ir.convenience.get_const_tensor(s2)
        for t, v in ((t1, inner), (t2, outer)):
            if t is not None and 0 in t.numpy().tolist() and v.producer().attributes.get_int("allowzero", 0):
                return result.fail("allowzero=1: a 0 is an empty dim, not a copy")
        middle = _apply(dims, t1.numpy().tolist()) if t1 is not None else _named(inner)
        if middle is None:
            final = None
        elif t2 is not None:
            final = _apply(middle, t2.numpy().tolist())
        else:
            final = _named(outer)
        if final is None or len(final) != len(dims):
            return result.fail("the round trip changes the rank")
        unknown = [i for i, d in enumerate(final) if d is None]
        if len(unknown) > 1 or any(final[i] != dims[i] for i in range(len(dims)) if i not in unknown):
            return result.fail("the round trip changes the shape")
        return result

    def rewrite(self, op, x, **_):
        return op.Identity(x)


def _named(value: ir.Value) -> list | None:
    """The value's annotated dims, if every one is an int or a named symbol."""
    if value is None or value.shape is None:
        return None
    dims = list(value.shape)
    return None if any(isinstance(d, ir.SymbolicDim) and d.value is None for d in dims) else dims


def _apply(dims: list, shape: list) -> list | None:
    """Dims after Reshape(·, shape) (allowzero=0): 0 copies the input dim, -1 is unknown (None)."""
    out = []
    for i, s in enumerate(shape):
        if s == 0:
            if i >= len(dims):
                return None
            out.append(dims[i])
        else:
            out.append(None if s == -1 else s)
    return out


MAX_SWEEPS = 4


@register_pass("simplify")
class SimplifyPass(KilnPass):
    def call(self, model: ir.Model):
        # onnxscript keeps its default rule list private; it is the set optimize() applies.
        before, nodes = fingerprint(model), count_nodes(model)
        rules = pattern.RewriteRuleSet([ReshapeRoundTrip.rule(), *rewriter._DEFAULT_REWRITE_RULES])
        count = identities = 0
        # Until nothing changes: a rewrite can make a new match (Transpose pairs cancel, and the
        # Reshapes around them become a round trip).
        for _ in range(MAX_SWEEPS):
            fired = rules.apply_to_model(model)
            found = sum(n.op_type == "Identity" for n in ir.traversal.RecursiveGraphIterator(model.graph))
            IdentityEliminationPass()(model)
            identities += found - sum(n.op_type == "Identity" for n in ir.traversal.RecursiveGraphIterator(model.graph))
            RemoveUnusedNodesPass()(model)
            count += fired
            if not fired:
                break
        stats = {"rewrites": count, "identities_removed": identities, "nodes_removed": nodes - count_nodes(model)}
        return self.result(model, modified=fingerprint(model) != before, stats=stats)

"""Fuse RMSNorm, and RMSNorm after a residual add, into ONNX Runtime's normalization ops.

    x * Reciprocal(Sqrt(ReduceMean(x^2, -1) + eps)) * g   ->  SimplifiedLayerNormalization(x, g, eps)
    RMSNorm(a + b)  (sum also used later)                 ->  SkipSimplifiedLayerNormalization(a, b, g)
                                                              (com.microsoft; 4th output is a + b)

Dims: B batch, S sequence, D hidden; the norm is over the last axis. Uses onnxscript's
rules (rms_normalization, skip_normalization). Requires constant eps and g.
Sites are counted as ReduceMean over a square (Pow(x, 2) or Mul(x, x)); every site that
does not fuse is a warning with the matcher's reason. ORT-specific: selected by the ORT
backend's lowering, not part of the portable IR.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions.rms_normalization import rms_normalization_rules
from onnxscript.rewriter.ort_fusions.skip_normalization import skip_rms_normalization_ruleset

from kiln.passes.base import KilnPass
from kiln.passes.registry import register_pass
from kiln.passes.rewriting import apply_rules


def _rms_sites(model: ir.Model) -> int:
    sites = 0
    for node in model.graph:
        if node.op_type != "ReduceMean" or node.inputs[0] is None:
            continue
        p = node.inputs[0].producer()
        if p is not None and (p.op_type == "Pow" or (p.op_type == "Mul" and p.inputs[0] is p.inputs[1])):
            sites += 1
    return sites


@register_pass("fuse-rms-norm")
class FuseRMSNormPass(KilnPass):
    def call(self, model: ir.Model):
        seen = _rms_sites(model)
        rms, reasons = apply_rules(model, list(rms_normalization_rules), expected=seen)
        skip, _ = apply_rules(model, list(skip_rms_normalization_ruleset.rules))
        stats = {"norms_seen": seen, "rms_fused": rms, "skip_fused": skip}
        return self.result(model, modified=rms + skip > 0, stats=stats, rejected=reasons,
                           warnings=self.coverage("RMSNorm", rms, seen, reasons))

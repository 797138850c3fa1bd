"""Fuse LayerNormalization after a residual add into ONNX Runtime's SkipLayerNormalization.

    LayerNormalization(a + b [+ bias], g, beta)   ->  SkipLayerNormalization(a, b, g, beta[, bias])
                                                      (com.microsoft; 4th output is the sum)

Dims: B batch, S sequence, D hidden. Uses onnxscript's skip_normalization rules. Sites are
LayerNormalization nodes fed by an Add of two same-shaped tensors (a residual); those left
unfused are a warning with the reason. The embeddings sum (a broadcast add of position
embeddings) is not a residual site and is left alone.
ORT-specific: selected by the ORT backend's lowering.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions.skip_normalization import skip_layer_normalization_ruleset

from kiln.passes.base import KilnPass
from kiln.passes.registry import register_pass
from kiln.passes.rewriting import apply_rules


def _is_residual_add(value: ir.Value) -> bool:
    """An Add of two same-shaped tensors (a broadcast add, e.g. position embeddings, is not a residual)."""
    add = value.producer()
    if add is None or add.op_type != "Add":
        return False
    a, b = (v.shape for v in add.inputs)
    return a is not None and b is not None and [str(d) for d in a] == [str(d) for d in b]


def _sites(model: ir.Model) -> int:
    return sum(1 for n in model.graph if n.op_type == "LayerNormalization" and n.inputs[0] is not None
               and _is_residual_add(n.inputs[0]))


@register_pass("fuse-layer-norm")
class FuseLayerNormPass(KilnPass):
    def call(self, model: ir.Model):
        seen = _sites(model)
        fused, reasons = apply_rules(model, list(skip_layer_normalization_ruleset.rules), expected=seen)
        stats = {"residual_norms_seen": seen, "skip_layer_norm_fused": fused}
        return self.result(model, modified=fused > 0, stats=stats, rejected=reasons,
                           warnings=self.coverage("SkipLayerNorm", fused, seen, reasons))

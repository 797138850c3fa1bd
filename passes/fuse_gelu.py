"""Fuse GELU subgraphs into ONNX Runtime's Gelu / BiasGelu / FastGelu.

    0.5 * x * (1 + Erf(x / sqrt(2)))                         ->  Gelu(x)        (exact form)
    0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 x^3)))    ->  FastGelu(x)    (tanh form)
    Gelu(x + bias)                                           ->  BiasGelu(x, bias)

Both are exact rewrites of the same formula (ORT evaluates them in fp32). Uses onnxscript's
erfgelu, gelu and bias_gelu rules. Sites are Erf and Tanh nodes; unfused ones are warned.
SiLU·mul (SwiGLU) has no fused CPU op in ORT and is left as is.
ORT-specific: selected by the ORT backend's lowering.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import erfgelu
from onnxscript.rewriter.ort_fusions.bias_gelu import bias_gelu_rules
from onnxscript.rewriter.ort_fusions.gelu import gelu_rules

from kiln.passes.base import KilnPass
from kiln.passes.registry import register_pass
from kiln.passes.rewriting import apply_rules


@register_pass("fuse-gelu")
class FuseGeluPass(KilnPass):
    def call(self, model: ir.Model):
        seen = sum(1 for n in model.graph if n.op_type in ("Erf", "Tanh"))
        gelu, reasons = apply_rules(model, [*erfgelu.rules.rules, *gelu_rules.rules], expected=seen)
        bias, _ = apply_rules(model, list(bias_gelu_rules.rules))
        stats = {"gelu_sites": seen, "gelu_fused": gelu, "bias_gelu_fused": bias}
        return self.result(model, modified=gelu + bias > 0, stats=stats, rejected=reasons,
                           warnings=self.coverage("GELU", gelu, seen, reasons))

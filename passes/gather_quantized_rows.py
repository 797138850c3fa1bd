"""Dequantize only the rows a Gather reads from a quantized table.

    Gather(DequantizeLinear(Eq[V, H], scale[V, H/bs], zp?, axis=1, block_size=bs), ids[...])
  ->
    DequantizeLinear(Gather(Eq, ids), Gather(scale, ids), Gather(zp, ids)?, axis=-1, block_size=bs)

Dims: V vocabulary, H hidden, bs the block size along H. Without this, ORT dequantizes the
whole table on every call (V×H values for a handful of tokens). Standard ONNX on both sides,
so it suits every backend; the ORT backend runs it after `lower-matmul-nbits`, which turns the
tables it can into GatherBlockQuantized. Exact.

Preconditions: a constant table quantized along axis 1 (blocks along H), Gather on axis 0.
Not handled: tables quantized along axis 0 (the dequantized rows would need every block);
4-bit tables (opset 21's Gather takes no int4), which stay whole.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from kiln.passes.base import KilnPass
from kiln.passes.registry import register_pass
from kiln.passes.rewriting import apply_rules


class GatherRowsRule(pattern.RewriteRuleClassBase):
    def __init__(self, zero_point: bool):
        super().__init__("GatherQuantizedRows" + ("" if zero_point else "-symmetric"))
        self._zero_point = zero_point

    def pattern(self, op, ids, q, scale, zero):
        inputs = (q, scale, zero) if self._zero_point else (q, scale)
        table = op.DequantizeLinear(*inputs, _allow_other_attributes=True, _outputs=["table"])
        return op.Gather(table, ids, _allow_other_attributes=True, _outputs=["gathered"])

    def check(self, context, ids, q, scale, zero=None, table=None, gathered=None, **_):
        result = pattern.MatchResult()
        dq = table.producer()
        if q.shape is None or len(q.shape) != 2 or dq.attributes.get_int("axis", 1) != 1:
            return result.fail("the table is not 2-D quantized along axis 1")
        if gathered.producer().attributes.get_int("axis", 0) != 0:
            return result.fail("Gather is not along axis 0")
        if q.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
            return result.fail("4-bit table: ONNX's Gather does not take int4 (GatherBlockQuantized does)")
        self._block = dq.attributes.get_int("block_size", 0)
        if scale.shape is None or len(scale.shape) != 2 or not self._block:
            return result.fail("per-tensor or per-axis scales: nothing to gather")
        return result

    def rewrite(self, op, ids, q, scale, zero=None, **_):
        inputs = [op.Gather(q, ids, axis=0), op.Gather(scale, ids, axis=0)]
        if zero is not None:
            inputs.append(op.Gather(zero, ids, axis=0))
        return op.DequantizeLinear(*inputs, axis=-1, block_size=self._block)


@register_pass("gather-quantized-rows")
class GatherQuantizedRowsPass(KilnPass):
    def call(self, model: ir.Model):
        seen = sum(1 for n in model.graph if n.op_type == "Gather" and n.inputs[0] is not None
                   and n.inputs[0].producer() is not None and n.inputs[0].producer().op_type == "DequantizeLinear")
        rewritten, reasons = apply_rules(model, [GatherRowsRule.rule(z) for z in (True, False)], expected=seen)
        return self.result(model, modified=rewritten > 0, stats={"tables_seen": seen, "rewritten": rewritten},
                           rejected=reasons if rewritten < seen else [],
                           warnings=self.coverage("quantized Gather", rewritten, seen, reasons))

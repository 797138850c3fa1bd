"""Lower per-channel int8 weight MatMuls to ONNX Runtime's DynamicQuantizeMatMul.

    MatMul(A[..., K], DequantizeLinear(Wq[K, N] int8|uint8, scale[1, N], zp?, axis=0, block_size=K))
    MatMul(A[..., K], Transpose(DequantizeLinear(Wq[N, K], scale[N, 1], zp?, axis=1, block_size=K)))
  ->
    DynamicQuantizeMatMul(A, Wq[K, N], scale[N], zp[N]?)                         (com.microsoft)

A constant bias added right after (Add(MatMul(...), b[N])) becomes the op's bias input.

ORT quantizes A to uint8 per call (one scale per tensor) and runs an integer GEMM: dynamic
int8 quantization. x86 AVX2 kernels sum u8·s8 products pairwise in int16, which saturates on
full-range int8 weights (measured: cosine 0.96 on a random layer): those are stored as uint8
with zero point 128 (the same values; u8·u8 cannot overflow but runs about 15% slower), while
7-bit weights (`quantize-weights` bits = 7, within [-64, 63]) keep the fast u8·s8 kernel.
It pays off where the GEMM is large (encoders, prefill); MatMulNBits
(`lower-matmul-nbits`) serves blocked weights, so this pass only takes what that one left:
one block spanning K (per output channel). The transposed form (a tied LM head) stores its
own [K, N] copy.

Lossy (activations are rounded to 8 bits): metric KL, budget 1e-2. Not handled: blocked
scales, 4-bit weights. ORT-specific: selected by the ORT backend's lowering.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass
from onnxscript.rewriter import pattern

from kiln.passes.base import KilnPass
from kiln.passes.registry import register_pass
from kiln.passes.rewriting import apply_rules, one_dequantize_per_reader


class DynamicQuantizeMatMulRule(pattern.RewriteRuleClassBase):
    def __init__(self, zero_point: bool, transposed: bool, bias: bool):
        super().__init__("DynamicQuantizeMatMul" + ("" if zero_point else "-symmetric")
                         + ("-transposed" if transposed else "") + ("-bias" if bias else ""))
        self._zero_point, self._transposed, self._bias = zero_point, transposed, bias

    def pattern(self, op, a, q, scale, zero, bias):
        inputs = (q, scale, zero) if self._zero_point else (q, scale)
        w = op.DequantizeLinear(*inputs, _allow_other_attributes=True, _outputs=["weight"])
        if self._transposed:
            w = op.Transpose(w, perm=[1, 0])
        y = op.MatMul(a, w)
        return op.Add(y, bias) if self._bias else y

    def check(self, context, a, q, scale, zero=None, weight=None, bias=None, **_):
        result = pattern.MatchResult()
        if bias is not None and (bias.const_value is None or len(bias.shape) != 1):
            return result.fail("the added term is not a constant vector")
        dq = weight.producer()
        if q.const_value is None or scale.const_value is None or (zero is not None and zero.const_value is None):
            return result.fail("the quantized weight is not constant")
        if q.const_value.dtype not in (ir.DataType.INT8, ir.DataType.UINT8):
            return result.fail(f"int8/uint8 weights only, not {q.const_value.dtype}")
        if len(q.shape) != 2:
            return result.fail("the weight is not 2-D")
        k_axis = 1 if self._transposed else 0
        if dq.attributes.get_int("axis", 1) != k_axis or dq.attributes.get_int("block_size", 0) != q.shape[k_axis]:
            return result.fail("not one scale per output channel (blocked weights go to MatMulNBits)")
        return result

    def rewrite(self, op, a, q, scale, zero=None, bias=None, **_):
        qa = q.const_value.numpy()
        scales = scale.const_value.numpy().reshape(-1)
        zp = zero.const_value.numpy().reshape(-1) if zero is not None else None
        if self._transposed:
            qa = qa.T
        if qa.dtype == np.int8 and (qa.min() < -64 or qa.max() > 63):
            # Full-range int8 would overflow AVX2's u8·s8 int16 pair sums; u8·u8 cannot (but is slower).
            qa = (qa.astype(np.int16) + 128).astype(np.uint8)
            zp = (zp.astype(np.int16) + 128 if zp is not None else np.full(scales.shape, 128)).astype(np.uint8)
        elif zp is None:
            zp = np.zeros(scales.shape, dtype=qa.dtype)
        inputs = [a, op.Constant(value=ir.tensor(np.ascontiguousarray(qa))), op.Constant(value=ir.tensor(scales)),
                  op.Constant(value=ir.tensor(zp))]
        if bias is not None:
            inputs.append(bias)
        return op.DynamicQuantizeMatMul(*inputs, _domain="com.microsoft")


@register_pass("lower-dynamic-quantize-matmul")
class LowerDynamicQuantizeMatMulPass(KilnPass):
    exact = False
    metric = "kl"
    budget = 1e-2

    def call(self, model: ir.Model):
        split = one_dequantize_per_reader(model.graph)
        readers = [u.node for n in model.graph if n.op_type == "DequantizeLinear" for u in n.outputs[0].uses()]
        readers += [u.node for r in readers if r.op_type == "Transpose" for u in r.outputs[0].uses()]
        seen = sum(r.op_type == "MatMul" for r in readers)
        rules = [DynamicQuantizeMatMulRule.rule(z, t, b) for b in (True, False) for z in (True, False)
                 for t in (False, True)]
        lowered, reasons = apply_rules(model, rules, expected=seen)
        if lowered:
            LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1024)(model)
        # Blocked or 4-bit leftovers are not this pass's job: they are reported, not warned.
        return self.result(model, modified=bool(lowered or split), stats={"quantized_matmuls_seen": seen, "lowered": lowered},
                           rejected=reasons if lowered < seen else [])

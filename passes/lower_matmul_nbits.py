"""Lower weight-only quantized MatMuls to ONNX Runtime's MatMulNBits.

    MatMul(A[..., K], DequantizeLinear(Wq[K, N], scale[K/bs, N], zp?, axis=0, block_size=bs))
  ->
    MatMulNBits(A, B[N, K/bs, bs·bits/8] uint8, scales[N·K/bs], zero_points, K, N, bits, block_size=bs)
                                                                             (com.microsoft)

Packing follows ORT: per output channel n, along K, two 4-bit values per byte (even index in
the low nibble); values are unsigned with a zero point per block (signed int4 q is stored as
q + 8 with zero point 8); K is padded to a whole block with the zero point. Exact: the kernel
dequantizes to the same values (accuracy_level sets the activation precision ORT may use:
0 = fp32, 4 = int8 activations, faster and no longer exact).

Not handled (left as DequantizeLinear + MatMul, which ORT also runs): per-channel scales
(block_size 0), block sizes ORT does not support (< 16 or not a power of two), non-constant
weights. ORT-specific: selected by the ORT backend's lowering.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass
from onnxscript.rewriter import pattern

from kiln.passes.base import KilnPass
from kiln.passes.registry import register_pass
from kiln.passes.rewriting import apply_rules

_SIGNED = {ir.DataType.INT4: 4, ir.DataType.INT8: 8}
_UNSIGNED = {ir.DataType.UINT4: 4, ir.DataType.UINT8: 8}


def pack(q: np.ndarray, zero: np.ndarray | None, scale: np.ndarray, bits: int, block: int, signed: bool):
    """(q [K, N], zero [K/bs, N] | None, scale [K/bs, N]) -> MatMulNBits (B, scales, zero_points)."""
    k, n = q.shape
    blocks = scale.shape[0]
    offset = 1 << (bits - 1) if signed else 0
    u = q.astype(np.int32) + offset
    zp = (zero.astype(np.int32) + offset) if zero is not None else np.full((blocks, n), offset, dtype=np.int32)
    padded = np.repeat(zp, block, axis=0)  # K padded with the zero point (dequantizes to 0)
    padded[:k] = u
    per_channel = padded.T.reshape(n, blocks, block).astype(np.uint8)  # [N, blocks, bs]
    if bits == 4:
        b = (per_channel[..., 0::2] | (per_channel[..., 1::2] << 4)).astype(np.uint8)
        zp_t = zp.T.astype(np.uint8)  # [N, blocks]
        if blocks % 2:
            zp_t = np.concatenate([zp_t, np.zeros((n, 1), dtype=np.uint8)], axis=1)
        zero_points = (zp_t[:, 0::2] | (zp_t[:, 1::2] << 4)).reshape(-1)
    else:
        b = per_channel
        zero_points = zp.T.astype(np.uint8).reshape(-1)
    return b, scale.T.astype(np.float32).reshape(-1), zero_points


class MatMulNBitsRule(pattern.RewriteRuleClassBase):
    def __init__(self, accuracy_level: int, zero_point: bool):
        super().__init__("MatMulNBits" + ("" if zero_point else "-symmetric"))
        self._accuracy_level = accuracy_level
        self._zero_point = zero_point

    def pattern(self, op, a, q, scale, zero):
        inputs = (q, scale, zero) if self._zero_point else (q, scale)
        w = op.DequantizeLinear(*inputs, _allow_other_attributes=True, _outputs=["weight"])
        return op.MatMul(a, w)

    def check(self, context, a, q, scale, zero=None, weight=None, **_):
        result = pattern.MatchResult()
        dq = weight.producer()
        if q.const_value is None or scale.const_value is None or (zero is not None and zero.const_value is None):
            return result.fail("the quantized weight is not constant")
        if q.const_value.dtype not in _SIGNED and q.const_value.dtype not in _UNSIGNED:
            return result.fail(f"MatMulNBits takes 4- or 8-bit weights, not {q.const_value.dtype}")
        if len(q.shape) != 2 or dq.attributes.get_int("axis", 1) != 0:
            return result.fail("the weight is not [K, N] quantized along K")
        block = dq.attributes.get_int("block_size", 0)
        if block < 16 or block & (block - 1):
            return result.fail(f"block size {block} is not a power of two >= 16 (per-channel scales stay QDQ)")
        self._block = block
        return result

    def rewrite(self, op, a, q, scale, zero=None, **_):
        dtype = q.const_value.dtype
        signed = dtype in _SIGNED
        bits = _SIGNED.get(dtype) or _UNSIGNED[dtype]
        k, n = q.shape
        b, scales, zero_points = pack(q.const_value.numpy(), zero.const_value.numpy() if zero is not None else None,
                                      scale.const_value.numpy(), bits, self._block, signed)
        return op.MatMulNBits(a, op.Constant(value=ir.tensor(b)), op.Constant(value=ir.tensor(scales)),
                              op.Constant(value=ir.tensor(zero_points)), K=k, N=n, bits=bits,
                              block_size=self._block, accuracy_level=self._accuracy_level, _domain="com.microsoft")


@register_pass("lower-matmul-nbits")
class LowerMatMulNBitsPass(KilnPass):
    def __init__(self, accuracy_level: int = 0):
        super().__init__()
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError("accuracy_level is 0 (fp32), 1, 2, 3 or 4 (int8 activations)")
        self.accuracy_level = accuracy_level
        if accuracy_level == 4:  # int8 activations change results slightly: a lossy pass then
            self.exact, self.metric, self.budget = False, "kl", 1e-2

    def call(self, model: ir.Model):
        seen = sum(1 for n in model.graph if n.op_type == "DequantizeLinear"
                   and any(u.node.op_type == "MatMul" for u in n.outputs[0].uses()))
        lowered, reasons = apply_rules(
            model, [MatMulNBitsRule.rule(self.accuracy_level, z) for z in (True, False)], expected=seen)
        if lowered:
            LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1024)(model)
        stats = {"quantized_matmuls_seen": seen, "lowered": lowered}
        return self.result(model, modified=lowered > 0, stats=stats, rejected=reasons if lowered < seen else [],
                           warnings=self.coverage("MatMulNBits", lowered, seen, reasons))

"""Lower weight-only quantized MatMuls and embedding tables to ONNX Runtime's contrib ops.

    MatMul(A[..., K], DequantizeLinear(Wq[K, N], scale[K/bs, N], zp?, axis=0, block_size=bs))
    MatMul(A[..., K], Transpose(DequantizeLinear(Wq[N, K], scale[N, K/bs], zp?, axis=1, block_size=bs)))
  ->
    MatMulNBits(A, B[N, K/bs, bs·bits/8] uint8, scales[N, K/bs], zero_points, K, N, bits, block_size=bs)

    Add(MatMulNBits(...), bias[N]) -> MatMulNBits(..., g_idx="", bias)     (as ORT fuses it at load)

    Gather(DequantizeLinear(Eq[V, H], scale[V, H/bs], zp?, axis=1, block_size=bs), ids[...])
  ->
    Reshape(GatherBlockQuantized(B[V, H/bs, bs·bits/8], ids, Reshape(scale, [V, H/bs, 1]), zp?,
                                 quantize_axis=2, block_size=bs, bits), [...ids, H])    (com.microsoft)

Packing follows ORT: per output channel n, along K, two 4-bit values per byte (even index in
the low nibble); values are unsigned with a zero point per block (signed int4 q is stored as
q + 8 with zero point 8); K is padded to a whole block with the zero point. A tied embedding
(one DequantizeLinear read by the Gather and, transposed, by the LM head) packs to the same
B bytes in both ops, and the two are merged into one initializer, so the artifact stores the
table once; GatherBlockQuantized reads the head's scales through a Reshape (folded by ORT
at load). Exact: the kernel
dequantizes to the same values (accuracy_level sets the activation precision ORT may use:
0 = fp32, 4 = int8 activations, faster and no longer exact).

Not handled (left as DequantizeLinear, which ORT also runs): per-channel scales
(block_size 0), block sizes ORT does not support (< 16 or not a power of two), non-constant
weights, tables whose H is not a whole number of blocks. ORT-specific: selected by the ORT
backend's lowering.

Compact scales (quantize-weights' `compact_scales`: the weight's scale is
DequantizeLinear(s8 uint8, step[N]) of two constants) stay compact in the artifact as
Mul(Cast(s8ᵀ), step) feeding the op, which ORT folds into float32 scales at load, so the
file keeps 8 bits per block. With accuracy_level 4, MatMulNBits reads scales that are not
folded wrongly (relative error 1.0 on ORT 1.32; levels 0-3 are right either way), so
`compact_scales=False` (the ORT backend's choice for a target that turns graph optimizations
off) stores them as float32 instead. Other scales stay float32 as they are.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import DeduplicateHashedInitializersPass, LiftConstantsToInitializersPass
from onnxscript.rewriter import pattern

from kiln.passes.base import KilnPass
from kiln.passes.quantization import compact_scale_parts
from kiln.passes.registry import register_pass
from kiln.passes.rewriting import apply_rules, one_dequantize_per_reader

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
    return np.ascontiguousarray(b), np.ascontiguousarray(scale.T, dtype=np.float32).reshape(-1), zero_points


def _scale_parts(scale: ir.Value) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(float32 scales, None) for a constant; (uint8 levels, step [N]) for compact scales;
    None otherwise. Levels are shaped as the scales."""
    if scale.const_value is not None:
        return scale.const_value.numpy(), None
    parts = compact_scale_parts(scale)
    return None if parts is None else (parts[0], parts[1].reshape(-1))


def _check_weight(q, scale, zero, dq, axis: int) -> tuple[pattern.MatchResult, int]:
    result = pattern.MatchResult()
    if q.const_value is None or _scale_parts(scale) is None or (zero is not None and zero.const_value is None):
        return result.fail("the quantized weight is not constant"), 0
    if q.const_value.dtype not in _SIGNED and q.const_value.dtype not in _UNSIGNED:
        return result.fail(f"4- or 8-bit weights only, not {q.const_value.dtype}"), 0
    if len(q.shape) != 2 or dq.attributes.get_int("axis", 1) != axis:
        return result.fail(f"the weight is not 2-D quantized along axis {axis}"), 0
    block = dq.attributes.get_int("block_size", 0)
    if block < 16 or block & (block - 1):
        return result.fail(f"block size {block} is not a power of two >= 16 (per-channel scales stay QDQ)"), 0
    return result, block


def _pack(q, scale, zero, block: int, transposed: bool):
    """MatMulNBits (B, scales [N, blocks], zero_points, bits, signed) from a DQ's constants;
    scales are float32, or (uint8 levels [N, blocks], step [N]) for compact scales."""
    dtype = q.const_value.dtype
    signed = dtype in _SIGNED
    bits = _SIGNED.get(dtype) or _UNSIGNED[dtype]
    qa = q.const_value.numpy()
    sa, step = _scale_parts(scale)
    za = zero.const_value.numpy() if zero is not None else None
    if transposed:  # [N, K] -> [K, N]
        qa, sa, za = qa.T, sa.T, (za.T if za is not None else None)
    b, scales, zero_points = pack(qa, za, sa, bits, block, signed)
    scales = scales.reshape(qa.shape[1], -1)
    return b, (scales if step is None else (scales.astype(np.uint8), step)), zero_points, bits, signed


def _scales_input(op, scales, compact: bool):
    """The kernel's float32 scales [N, blocks]: a constant, or compact levels × step (folded by ORT)."""
    if not isinstance(scales, tuple):
        return op.Constant(value=ir.tensor(scales))
    levels, step = scales
    if not compact:
        return op.Constant(value=ir.tensor(levels.astype(np.float32) * step[:, None]))
    return op.Mul(op.Cast(op.Constant(value=ir.tensor(levels)), to=ir.DataType.FLOAT),
                  op.Constant(value=ir.tensor(step[:, None])))


class MatMulNBitsRule(pattern.RewriteRuleClassBase):
    def __init__(self, accuracy_level: int, zero_point: bool, transposed: bool, compact: bool):
        super().__init__("MatMulNBits" + ("" if zero_point else "-symmetric") + ("-transposed" if transposed else ""))
        self._accuracy_level, self._zero_point, self._transposed = accuracy_level, zero_point, transposed
        self._compact = compact

    def pattern(self, op, a, q, scale, zero):
        inputs = (q, scale, zero) if self._zero_point else (q, scale)
        w = op.DequantizeLinear(*inputs, _allow_other_attributes=True, _outputs=["weight"])
        if self._transposed:
            w = op.Transpose(w, perm=[1, 0])
        return op.MatMul(a, w)

    def check(self, context, a, q, scale, zero=None, weight=None, **_):
        result, self._block = _check_weight(q, scale, zero, weight.producer(), 1 if self._transposed else 0)
        return result

    def rewrite(self, op, a, q, scale, zero=None, **_):
        b, scales, zero_points, bits, signed = _pack(q, scale, zero, self._block, self._transposed)
        k, n = (q.shape[1], q.shape[0]) if self._transposed else (q.shape[0], q.shape[1])
        inputs = [a, op.Constant(value=ir.tensor(b)), _scales_input(op, scales, self._compact)]
        if zero is not None or not signed:
            inputs.append(op.Constant(value=ir.tensor(zero_points)))
        # else: symmetric weights sit on ORT's default zero point (2^(bits-1)), and leaving the
        # input out selects MLAS's kernels without zero-point handling.
        return op.MatMulNBits(*inputs, K=k, N=n, bits=bits, block_size=self._block,
                              accuracy_level=self._accuracy_level, _domain="com.microsoft")


class MatMulNBitsBiasRule(pattern.RewriteRuleClassBase):
    """Add(MatMulNBits(...), bias[N]) -> MatMulNBits(..., bias): what ORT's MatMulNBitsFusion
    does at load from level "extended" on. Done here, the graph kiln verifies is the one ORT runs:
    with int8 activations the fused kernel rounds differently (MiniLM int8: max_rel 0.024 between
    the two, each 0.025 from fp32), so leaving the fusion to ORT would ship unverified numbers."""

    def __init__(self, bias_first: bool):
        super().__init__("MatMulNBits-bias" + ("-first" if bias_first else ""))
        self._bias_first = bias_first

    def pattern(self, op, a, bias):
        mm = op.MatMulNBits(a, _allow_other_inputs=True, _allow_other_attributes=True, _domain="com.microsoft",
                            _outputs=["mm"])
        return op.Add(bias, mm) if self._bias_first else op.Add(mm, bias)

    def check(self, context, a, bias, mm=None, **_):
        result = pattern.MatchResult()
        node = mm.producer()
        n = node.attributes.get_int("N", 0)
        value = bias.const_value
        if value is None or value.dtype != ir.DataType.FLOAT or tuple(value.shape) != (n,):
            return result.fail(f"the added value is not a constant float bias of shape [{n}]")
        if len(node.inputs) > 4 or len(mm.uses()) != 1:
            return result.fail("the MatMulNBits already has a g_idx or bias input, or other readers")
        return result

    def rewrite(self, op, a, bias, mm=None, **_):
        node = mm.producer()
        inputs = list(node.inputs) + [None] * (5 - len(node.inputs)) + [bias]
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        return op.MatMulNBits(*inputs, **attributes, _domain="com.microsoft")


class GatherBlockQuantizedRule(pattern.RewriteRuleClassBase):
    def __init__(self, zero_point: bool, compact: bool):
        super().__init__("GatherBlockQuantized" + ("" if zero_point else "-symmetric"))
        self._zero_point, self._compact = zero_point, compact

    def pattern(self, op, ids, q, scale, zero):
        inputs = (q, scale, zero) if self._zero_point else (q, scale)
        table = op.DequantizeLinear(*inputs, _allow_other_attributes=True, _outputs=["table"])
        return op.Gather(table, ids, _allow_other_attributes=True, _outputs=["gathered"])

    def check(self, context, ids, q, scale, zero=None, table=None, gathered=None, **_):
        result, self._block = _check_weight(q, scale, zero, table.producer(), 1)
        if not result:
            return result
        if gathered.producer().attributes.get_int("axis", 0) != 0:
            return result.fail("Gather is not along axis 0")
        if q.shape[1] % self._block:
            return result.fail(f"hidden size {q.shape[1]} is not a whole number of blocks of {self._block}")
        if ids.shape is None:
            return result.fail("the indices' rank is unknown")
        return result

    def rewrite(self, op, ids, q, scale, zero=None, **_):
        b, scales, _, bits, signed = _pack(q, scale, zero, self._block, transposed=True)
        v, h = q.shape
        blocks = h // self._block
        offset = 1 << (bits - 1)
        if zero is not None:
            zp = zero.const_value.numpy().astype(np.int32) + (offset if signed else 0)
        else:
            zp = np.full((v, blocks), offset, dtype=np.int32)
        # the same constants as the tied head's MatMulNBits scales, so the two are stored once
        scales3 = op.Reshape(_scales_input(op, scales, self._compact), op.Constant(value=ir.tensor(np.array([v, blocks, 1]))))
        gathered = op.GatherBlockQuantized(
            op.Constant(value=ir.tensor(b)), ids, scales3, op.Constant(value=ir.tensor(zp.astype(np.uint8)[..., None])),
            gather_axis=0, quantize_axis=2, block_size=self._block, bits=bits, _domain="com.microsoft")
        shape = np.array([0] * len(ids.shape) + [h], dtype=np.int64)  # 0 keeps the index dims
        return op.Reshape(gathered, op.Constant(value=ir.tensor(shape)))


@register_pass("lower-matmul-nbits")
class LowerMatMulNBitsPass(KilnPass):
    def __init__(self, accuracy_level: int = 0, compact_scales: bool = True, budget: float = 1e-2):
        super().__init__()
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError("accuracy_level is 0 (fp32), 1, 2, 3 or 4 (int8 activations)")
        self.accuracy_level, self.compact_scales = accuracy_level, compact_scales
        if accuracy_level == 4:  # int8 activations change results slightly: a lossy pass then (KL budget)
            self.exact, self.metric, self.budget = False, "kl", budget

    def call(self, model: ir.Model):
        split = one_dequantize_per_reader(model.graph)
        readers = [u.node for n in model.graph if n.op_type == "DequantizeLinear" for u in n.outputs[0].uses()]
        readers += [u.node for r in readers if r.op_type == "Transpose" for u in r.outputs[0].uses()]
        seen = sum(r.op_type == "MatMul" for r in readers)
        tables = sum(r.op_type == "Gather" for r in readers)
        rules = [MatMulNBitsRule.rule(self.accuracy_level, z, t, self.compact_scales)
                 for z in (True, False) for t in (False, True)]
        lowered, reasons = apply_rules(model, rules, expected=seen)
        biases = pattern.RewriteRuleSet([MatMulNBitsBiasRule.rule(first) for first in (False, True)]).apply_to_model(model)
        gathers, gather_reasons = apply_rules(
            model, [GatherBlockQuantizedRule.rule(z, self.compact_scales) for z in (True, False)], expected=tables)
        if lowered or gathers:
            LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1024)(model)
            # A tied table packs to the same bytes for MatMulNBits and GatherBlockQuantized: keep one.
            DeduplicateHashedInitializersPass()(model)
        stats = {"quantized_matmuls_seen": seen, "lowered": lowered, "biases_fused": biases, "tables_seen": tables,
                 "tables_lowered": gathers}
        rejected = (reasons if lowered < seen else []) + (gather_reasons if gathers < tables else [])
        warnings = (self.coverage("MatMulNBits", lowered, seen, reasons)
                    + self.coverage("GatherBlockQuantized", gathers, tables, gather_reasons))
        return self.result(model, modified=bool(lowered or gathers or split), stats=stats, rejected=rejected, warnings=warnings)

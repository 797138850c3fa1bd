"""Fuse attention into ONNX Runtime's GroupQueryAttention (decoders with a KV cache) or
MultiHeadAttention (everything else, e.g. BERT encoders).

Step 1, onnxscript's SDPA rule: the decomposed attention
    Softmax(Q·Kᵀ·scale + mask) · V       (with the exporter's IsNaN guard)
becomes an intermediate SDPA(Q, K, V, mask) node.
Step 2, kiln's GQA rule, on the graph written by insert-kv-cache:
    K_all = Concat(past_key, K, axis=2);  K_rep = Reshape(Expand(Unsqueeze(K_all)))   (GQA repeat,
    absent when heads are equal); same for V;  SDPA(Q, K_rep, V_rep, mask)
  ->
    GroupQueryAttention(Q[B,S,H·Dh], K[B,S,Hkv·Dh], V, past_key, past_value,
                        seqlens_k = T-1 for every row, total_sequence_length = T,
                        attention_bias = mask)      -> output, present_key, present_value
  Padding and causality stay in kiln's additive mask (attention_bias, [B,1,S,T]); the op's
  own causal rule (query i sees slots <= P+i) is the same as kiln's, so the two agree.
  RoPE stays outside the op (do_rotary=0). ORT's CPU kernel accepts S>1 with a non-empty
  past only for batch 1; kiln's runtime prefills with an empty past, so it never asks.
Step 3, onnxscript's SDPA→MHA rule for the remaining SDPA nodes (K/V already repeated).

Dims: B batch, S new tokens, P past, T = P + S, H query heads, Hkv kv heads, Dh head dim.
Every attention that does not become GQA in a model with a KV cache is a warning with the
reason. ORT-specific: selected by the ORT backend's lowering.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.sdpa import sdpa_rules
from onnxscript.rewriter.ort_fusions.sdpa_via_mha import _rules as sdpa_to_mha_rules

from kiln.errors import KilnError
from kiln.ir import KV_CACHE_METADATA
from kiln.passes.base import KilnPass
from kiln.passes.kv_layout import decode_consistency
from kiln.passes.registry import register_pass
from kiln.passes.rewriting import apply_rules, count_ops


def _dim(value: ir.Value, axis: int):
    if value.shape is None or len(value.shape) <= axis:
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


class GroupQueryAttentionRule(pattern.RewriteRuleClassBase):
    def __init__(self, repeated: bool):
        super().__init__("GQA" if repeated else "GQA-equal-heads", remove_nodes=True)
        self._repeated = repeated

    def pattern(self, op, query, key, value, past_key, past_value, mask):
        key_all = op.Concat(past_key, key, axis=2, _outputs=["key_all"])
        value_all = op.Concat(past_value, value, axis=2, _outputs=["value_all"])
        key_rep, value_rep = key_all, value_all
        if self._repeated:
            key_rep = op.Reshape(op.Expand(op.Unsqueeze(key_all, pattern.ANY_VALUE), pattern.ANY_VALUE), pattern.ANY_VALUE)
            value_rep = op.Reshape(op.Expand(op.Unsqueeze(value_all, pattern.ANY_VALUE), pattern.ANY_VALUE), pattern.ANY_VALUE)
        out = op.SDPA(query, key_rep, value_rep, mask, key_format="BHSd", _domain="ai.onnxruntime._fusion",
                      _allow_other_attributes=True, _outputs=["attention"])
        return out, key_all, value_all

    def check(self, context, query, key, value, past_key, past_value, mask, attention, **_):
        result = pattern.MatchResult()
        graph_inputs = set(context.graph_or_function.inputs) if hasattr(context.graph_or_function, "inputs") else set()
        if past_key not in graph_inputs or past_value not in graph_inputs:
            return result.fail("K/V are not concatenated with a past-cache graph input")
        heads, kv_heads = _dim(query, 1), _dim(past_key, 1)
        head_dim, v_dim = _dim(past_key, 3), _dim(past_value, 3)
        if None in (heads, kv_heads, head_dim, v_dim):
            return result.fail("head counts or head size are not static")
        if heads % kv_heads or (heads != kv_heads) != self._repeated:
            return result.fail(f"{heads} query heads do not group over {kv_heads} kv heads")
        if head_dim != v_dim:
            return result.fail("GroupQueryAttention needs equal K and V head sizes")
        if mask is None or mask.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            return result.fail("attention needs kiln's additive mask (run insert-kv-cache first)")
        self._heads, self._kv_heads, self._head_dim = heads, kv_heads, head_dim
        self._scale = attention.producer().attributes.get_float("scale", None)
        return result

    def rewrite(self, op, query, key, value, past_key, past_value, mask, **_):
        bsd = op.Constant(value=ir.tensor(np.array([0, 0, -1], dtype=np.int64)))

        def to_bsd(x):
            return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), bsd)

        total = op.Cast(op.Squeeze(op.Shape(mask, start=3, end=4)), to=ir.DataType.INT32)
        seqlens = op.Expand(op.Sub(total, op.Constant(value=ir.tensor(np.array(1, dtype=np.int32)))),
                            op.Shape(query, start=0, end=1))
        attrs = {"num_heads": self._heads, "kv_num_heads": self._kv_heads}
        if self._scale is not None:
            attrs["scale"] = self._scale
        out, present_key, present_value = op.GroupQueryAttention(
            to_bsd(query), to_bsd(key), to_bsd(value), past_key, past_value, seqlens, total,
            None, None, None, mask, _domain="com.microsoft", _outputs=3, **attrs)
        bhsd = op.Constant(value=ir.tensor(np.array([0, 0, self._heads, self._head_dim], dtype=np.int64)))
        return op.Transpose(op.Reshape(out, bhsd), perm=[0, 2, 1, 3]), present_key, present_value


@register_pass("fuse-attention")
class FuseAttentionPass(KilnPass):
    def call(self, model: ir.Model):
        seen = count_ops(model, "Softmax")
        has_cache = KV_CACHE_METADATA in model.metadata_props
        sdpa, sdpa_reasons = apply_rules(model, list(sdpa_rules.rules), expected=seen)
        gqa, gqa_reasons = (apply_rules(model, [GroupQueryAttentionRule.rule(True), GroupQueryAttentionRule.rule(False)], expected=sdpa)
                            if has_cache and sdpa else (0, []))
        mha, _ = apply_rules(model, list(sdpa_to_mha_rules.rules)) if sdpa > gqa else (0, [])
        if count_ops(model, "SDPA", "ai.onnxruntime._fusion"):
            raise KilnError("fuse-attention: an intermediate SDPA node could not be lowered to an ORT attention op")
        stats = {"attentions_seen": seen, "sdpa_matched": sdpa, "gqa_fused": gqa, "mha_fused": mha}
        warnings = self.coverage("attention", sdpa, seen, sdpa_reasons)
        if has_cache:
            warnings += self.coverage("GroupQueryAttention", gqa, sdpa, gqa_reasons)
            if gqa:
                stats["decode_check_max_rel"] = float(f"{decode_consistency(model):.3g}")
        return self.result(model, modified=sdpa > 0, stats=stats, rejected=sdpa_reasons + gqa_reasons,
                           warnings=warnings)

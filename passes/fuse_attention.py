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
  RoPE on Q and K (onnxscript's rotary rule finds it) is absorbed into the op (do_rotary=1)
  with cos/sin caches computed by evaluating the model's own cos/sin subgraph on positions
  0..max_positions-1, and position_ids as the op's position input; otherwise RoPE stays
  outside (do_rotary=0). ORT's CPU kernel accepts S>1 with a non-empty past only for batch
  1, and with fused rotary it rotates a padded first prompt's cached K by slot; so the
  layout gets `padded_prefill: false` and runtimes prefill one sequence at a time.
  When every attention is GQA, the layout also gets `shared_buffer: true` (checked numerically
  on a preallocated past with random free slots): the past may be a longer preallocated
  buffer, and present (the same length) may be bound to the same memory, as the
  onnxruntime-genai runtime does, so a decode step writes one slot instead of copying the cache.
  Sliding windows and ALiBi stay in kiln's additive mask (attention_bias: [B,1,S,T], or
  [B,H,S,T] with ALiBi), which GroupQueryAttention adds before its softmax, so the op's
  local_window_size is not used (exact as is; the decode check crosses every window listed
  under the layout's "attention"). RoPE that the op cannot absorb (partial rotary, GPT-J's
  interleaved RoPE applied before the head transpose) stays outside with do_rotary=0 and a
  reason per layer in `rejected` (partial rotary: also a warning).
Step 0 (with a cache): K/V with fewer heads than Q that reach the attention MatMuls by
  broadcasting (multi-query, e.g. Falcon) get the explicit repeat Reshape(Expand(Unsqueeze))
  that the SDPA and GQA rules recognise.
Step 3, onnxscript's SDPA→MHA rule for the remaining SDPA nodes (K/V already repeated).
Step 1b (with a cache), softcap attention, which the SDPA rule does not take:
    Softmax(Mul(Tanh(Div(Mul(Q·K_repᵀ, scale), cap)), cap) + mask) · V_rep
  -> GroupQueryAttention(..., scale, softcap=cap, attention_bias=mask)    (Gemma 2)
Not fused, with the reason from the shared attention analysis (`kiln.passes.analysis.attention`):
softcap attention without a cache, scores computed per batch·head with 3-D MatMuls (Bloom).

Dims: B batch, S new tokens, P past, T = P + S, H query heads, Hkv kv heads, Dh head dim.
Every attention that does not become GQA in a model with a KV cache is a warning with the
reason. ORT-specific: selected by the ORT backend's lowering.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import InlinePass
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.rotary_embedding import rotary_embedding_rules as rotary_rules
from onnxscript.rewriter.ort_fusions.sdpa import sdpa_rules
from onnxscript.rewriter.ort_fusions.sdpa_via_mha import _rules as sdpa_to_mha_rules

from kiln.errors import KilnError
from kiln.ir import kv_layout, set_kv_layout
from kiln.passes.analysis.attention import Attention, find_attentions
from kiln.passes.base import KilnPass
from kiln.passes.kv_layout import decode_consistency
from kiln.passes.numerics import evaluate_subgraph
from kiln.passes.registry import register_pass
from kiln.passes.rewriting import apply_rules, count_ops


def _bsd_shape(x: ir.Value) -> ir.Shape | None:
    """[B, S, H·D] for an annotated [B, H, S, D] value."""
    if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[1], int) or not isinstance(x.shape[3], int):
        return None
    return ir.Shape([x.shape[0], x.shape[2], x.shape[1] * x.shape[3]])


def _dim(value: ir.Value, axis: int):
    if value.shape is None or len(value.shape) <= axis:
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


class GroupQueryAttentionRule(pattern.RewriteRuleClassBase):
    def __init__(self, repeated: bool):
        super().__init__("GQA" if repeated else "GQA-equal-heads", remove_nodes=True)
        self._repeated = repeated

    def _cached_kv(self, op, key, value, past_key, past_value):
        """K and V concatenated with the cache, and repeated to the query heads when GQA repeats them."""
        key_all = op.Concat(past_key, key, axis=2, _outputs=["key_all"])
        value_all = op.Concat(past_value, value, axis=2, _outputs=["value_all"])
        key_rep, value_rep = key_all, value_all
        if self._repeated:
            key_rep = op.Reshape(op.Expand(op.Unsqueeze(key_all, pattern.ANY_VALUE), pattern.ANY_VALUE), pattern.ANY_VALUE)
            value_rep = op.Reshape(op.Expand(op.Unsqueeze(value_all, pattern.ANY_VALUE), pattern.ANY_VALUE), pattern.ANY_VALUE)
        return key_all, value_all, key_rep, value_rep

    def pattern(self, op, query, key, value, past_key, past_value, mask):
        key_all, value_all, key_rep, value_rep = self._cached_kv(op, key, value, past_key, past_value)
        out = op.SDPA(query, key_rep, value_rep, mask, key_format="BHSd", _domain="ai.onnxruntime._fusion",
                      _allow_other_attributes=True, _outputs=["attention"])
        return out, key_all, value_all

    def check(self, context, query, key, value, past_key, past_value, mask, attention, **_):
        result = self._check_cache(context, query, past_key, past_value, mask)
        if result:
            self._scale = attention.producer().attributes.get_float("scale", None)
        return result

    def _check_cache(self, context, query, past_key, past_value, mask) -> pattern.MatchResult:
        """K/V concatenated with the cache inputs, static head counts that group, kiln's mask."""
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
        return result

    def rewrite(self, op, query, key, value, past_key, past_value, mask, **_):
        return self._gqa(op, query, key, value, past_key, past_value, mask, rotary=None)

    def _gqa(self, op, query, key, value, past_key, past_value, mask, rotary):
        bsd = op.Constant(value=ir.tensor(np.array([0, 0, -1], dtype=np.int64)))

        def to_bsd(x):
            out = op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), bsd)
            out.dtype, out.shape = x.dtype, _bsd_shape(x)  # lets simplify drop the model's own BSD -> BSHD -> BSD round trips
            return out

        # From the mask only (shared by every layer), so CSE leaves one copy for the whole model
        # and the query's layout ops are not kept alive by a Shape.
        total = op.Cast(op.Squeeze(op.Shape(mask, start=3, end=4)), to=ir.DataType.INT32)
        seqlens = op.Expand(op.Sub(total, op.Constant(value=ir.tensor(np.array(1, dtype=np.int32)))),
                            op.Shape(mask, start=0, end=1))
        attrs = {"num_heads": self._heads, "kv_num_heads": self._kv_heads}
        if self._scale is not None:
            attrs["scale"] = self._scale
        if getattr(self, "_softcap", None):
            attrs["softcap"] = self._softcap
        cos_cache, sin_cache, positions = rotary or (None, None, None)
        if rotary:
            attrs.update(do_rotary=1, rotary_interleaved=self._interleaved)
        out, present_key, present_value = op.GroupQueryAttention(
            to_bsd(query), to_bsd(key), to_bsd(value), past_key, past_value, seqlens, total,
            cos_cache, sin_cache, positions, mask, _domain="com.microsoft", _outputs=3, **attrs)
        out.dtype, out.shape = query.dtype, _bsd_shape(query)
        bhsd = op.Constant(value=ir.tensor(np.array([0, 0, self._heads, self._head_dim], dtype=np.int64)))
        return op.Transpose(op.Reshape(out, bhsd), perm=[0, 2, 1, 3]), present_key, present_value


class SoftcapGroupQueryAttentionRule(GroupQueryAttentionRule):
    """Attention-logit softcapping (Gemma 2), which the SDPA rule does not take, straight from
    the decomposed graph insert-kv-cache writes:
        Softmax(Mul(Tanh(Div(Mul(Q·K_repᵀ, scale), cap)), cap) + mask) · V_rep
    -> GroupQueryAttention(..., scale, softcap=cap, attention_bias=mask). ORT applies the
    softcap to the scaled scores and then adds the bias, the model's own order. RoPE stays outside."""

    def __init__(self, repeated: bool):
        pattern.RewriteRuleClassBase.__init__(self, "GQA-softcap" if repeated else "GQA-softcap-equal-heads",
                                              remove_nodes=True)
        self._repeated = repeated

    def pattern(self, op, query, key, value, past_key, past_value, mask, scale, cap_in, cap_out):
        key_all, value_all, key_rep, value_rep = self._cached_kv(op, key, value, past_key, past_value)
        scores = op.Mul(op.MatMul(query, op.Transpose(key_rep, perm=[0, 1, 3, 2])), scale)
        capped = op.Mul(op.Tanh(op.Div(scores, cap_in)), cap_out)
        probs = op.Softmax(op.Add(capped, mask), axis=-1)
        return op.MatMul(probs, value_rep, _outputs=["attention"]), key_all, value_all

    def check(self, context, query, key, value, past_key, past_value, mask, attention, scale, cap_in, cap_out, **_):
        result = pattern.MatchResult()
        consts = [None if v.const_value is None or v.const_value.size != 1 else float(v.const_value.numpy().reshape(-1)[0])
                  for v in (scale, cap_in, cap_out)]
        if None in consts or consts[1] != consts[2] or consts[1] <= 0:
            return result.fail("scale and softcap are not positive constant scalars (cap the same in Div and Mul)")
        self._scale, self._softcap = consts[0], consts[1]
        return self._check_cache(context, query, past_key, past_value, mask)


class RotaryGroupQueryAttentionRule(GroupQueryAttentionRule):
    """GQA that also absorbs RoPE on Q and K (do_rotary=1, cos/sin caches, position_ids)."""

    def __init__(self, repeated: bool, max_positions: int):
        pattern.RewriteRuleClassBase.__init__(self, "GQA-rotary" if repeated else "GQA-rotary-equal-heads",
                                              remove_nodes=True)
        self._repeated = repeated
        self._max_positions = max_positions
        self._caches: dict[tuple, tuple] = {}
        self._cache_values: dict[int, tuple] = {}

    def pattern(self, op, query, key, value, past_key, past_value, mask, cos, sin):
        q_rope = op.RotaryEmbedding(query, cos, sin, _domain="ai.onnxruntime._fusion",
                                    _allow_other_attributes=True, _outputs=["q_rope"])
        k_rope = op.RotaryEmbedding(key, cos, sin, _domain="ai.onnxruntime._fusion",
                                    _allow_other_attributes=True, _outputs=["k_rope"])
        return super().pattern(op, q_rope, k_rope, value, past_key, past_value, mask)

    def check(self, context, query, key, value, past_key, past_value, mask, attention, cos, sin, q_rope, **_):
        result = super().check(context, q_rope, key, value, past_key, past_value, mask, attention)
        if not result:
            return result
        positions = next((v for v in context.model.graph.inputs if v.name == "position_ids"), None)
        if positions is None:
            return result.fail("no position_ids input (run insert-kv-cache first)")
        if self._head_dim % 16:
            return result.fail(f"ORT's fused rotary needs a head size that is a multiple of 16, not {self._head_dim}")
        self._interleaved = q_rope.producer().attributes.get_int("interleaved", 0)
        key_ = (id(cos), id(sin))
        if key_ not in self._caches:
            try:
                grid = np.arange(self._max_positions, dtype=np.int64)[None]
                cos_v, sin_v = evaluate_subgraph(context.model, {positions: grid}, [cos, sin])
            except Exception as exc:
                return result.fail(f"cos/sin are not a function of position_ids alone ({exc})")
            cos_v, sin_v = (np.asarray(a).reshape(self._max_positions, -1) for a in (cos_v, sin_v))
            half = cos_v.shape[1] // 2
            if self._interleaved:
                cos_h, sin_h = cos_v[:, ::2], sin_v[:, ::2]
                same = np.allclose(cos_v[:, 1::2], cos_h) and np.allclose(sin_v[:, 1::2], sin_h)
            else:
                cos_h, sin_h = cos_v[:, :half], sin_v[:, :half]
                same = np.allclose(cos_v[:, half:], cos_h) and np.allclose(sin_v[:, half:], sin_h)
            if not same or cos_v.shape[1] != self._head_dim:
                return result.fail("cos/sin do not rotate the whole head in pairs (partial rotary)")
            self._caches[key_] = (cos_h.astype(np.float32), sin_h.astype(np.float32))
        self._cache = self._caches[key_]
        self._positions = positions
        return result

    def rewrite(self, op, query, key, value, past_key, past_value, mask, **_):
        # One cos/sin cache for all layers: the first rewrite (layer 0) creates it, later
        # layers (after it in graph order) reuse its values.
        key_ = id(self._cache)
        if key_ not in self._cache_values:
            self._cache_values[key_] = (op.Constant(value=ir.tensor(self._cache[0])),
                                        op.Constant(value=ir.tensor(self._cache[1])))
        cos_cache, sin_cache = self._cache_values[key_]
        return self._gqa(op, query, key, value, past_key, past_value, mask,
                         rotary=(cos_cache, sin_cache, self._positions))


def _explicit_head_repeat(model: ir.Model) -> int:
    """Multi-query / grouped K and V that reach the attention MatMuls with fewer heads than Q
    (the MatMul broadcasts them, e.g. Falcon's multi_query) get the explicit repeat that the
    SDPA and GQA rules recognise:  Reshape(Expand(Unsqueeze(K_all, 2), [1,1,rep,1,1]), [0,H,-1,Dh]).
    Only the attention's reader changes; the present output keeps Hkv heads."""
    added = 0
    for _, att in find_attentions(model):
        if not isinstance(att, Attention):
            continue
        heads = _dim(att.qk.inputs[0], 1)
        for matmul in (att.qk, att.pv):
            reader, value = matmul, matmul.inputs[1]
            while value.producer() is not None and value.producer().op_type == "Transpose":
                reader, value = value.producer(), value.producer().inputs[0]
            concat = value.producer()
            kv_heads, head_dim = _dim(value, 1), _dim(value, 3)
            if (concat is None or concat.op_type != "Concat" or not concat.inputs[0].is_graph_input()
                    or None in (heads, kv_heads, head_dim) or kv_heads >= heads or heads % kv_heads):
                continue
            tape = ir.tape.Tape()

            def const(array, tape=tape):
                return tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(array, dtype=np.int64))})

            rep = heads // kv_heads
            unsq = tape.op("Unsqueeze", [value, const([2])])
            expand = tape.op("Expand", [unsq, const([1, 1, rep, 1, 1])])
            out = tape.op("Reshape", [expand, const([0, heads, -1, head_dim])])
            dims = list(value.shape)
            unsq.dtype = expand.dtype = out.dtype = value.dtype
            unsq.shape = ir.Shape([dims[0], kv_heads, 1, dims[2], head_dim])
            expand.shape = ir.Shape([dims[0], kv_heads, rep, dims[2], head_dim])
            out.shape = ir.Shape([dims[0], heads, dims[2], head_dim])
            model.graph.insert_before(reader, tape.nodes)
            reader.replace_input_with(list(reader.inputs).index(value), out)
            if reader.op_type == "Transpose" and reader.outputs[0].shape is not None:
                perm = reader.attributes.get_ints("perm", None)
                if perm is not None:
                    reader.outputs[0].shape = ir.Shape([list(out.shape)[i] for i in perm])
            added += 1
    return added


def _why_not_sdpa(model: ir.Model) -> list[str]:
    """For each attention still decomposed after the SDPA rule, what in its form kept it so."""
    reasons = []
    for sm, att in find_attentions(model):
        if not isinstance(att, Attention):
            continue
        if att.softcap:
            reasons.append(f"attention at {sm.name}: logit softcapping (tanh) on the scores is not fused; left as plain ops")
        elif len(att.scores.shape or ()) == 3:
            reasons.append(f"attention at {sm.name}: scores computed per batch·head (3-D MatMul, e.g. ALiBi models) "
                           "are not fused; left as plain ops")
        else:
            reasons.append(f"attention at {sm.name}: not the SDPA pattern; left as plain ops")
    return reasons


def _rope_reasons(reasons: list[str]) -> list[str]:
    """The rotary GQA rules' mismatches, one line per attention: why RoPE stays outside the op."""
    out: dict[str, str] = {}
    for r in reasons:
        where, _, why = r.partition(": ")
        site = where.split(" at ", 1)[-1]
        if "expected RotaryEmbedding, got Concat" in why:
            why = "RoPE on part of each head (partial rotary) stays outside GroupQueryAttention (do_rotary=0)"
        elif "expected RotaryEmbedding" in why:
            why = ("no RoPE that the op can absorb on K (none, or applied before the head transpose); "
                   "any RoPE stays outside GroupQueryAttention (do_rotary=0)")
        out.setdefault(site, f"GQA at {site}: {why}")
    return list(out.values())


@register_pass("fuse-attention")
class FuseAttentionPass(KilnPass):
    def __init__(self, max_positions: int = 8192):
        super().__init__()
        self.max_positions = max_positions

    def call(self, model: ir.Model):
        seen = count_ops(model, "Softmax")
        has_cache = kv_layout(model) is not None
        repeats = _explicit_head_repeat(model) if has_cache else 0
        sdpa, sdpa_reasons = apply_rules(model, list(sdpa_rules.rules), expected=seen)
        if sdpa < seen:
            sdpa_reasons = _why_not_sdpa(model) or sdpa_reasons
        rotary = gqa = softcap = 0
        gqa_reasons: list[str] = []
        if has_cache and sdpa < seen:  # softcap attention, which the SDPA rule leaves
            softcap, _ = apply_rules(model, [SoftcapGroupQueryAttentionRule.rule(r) for r in (True, False)])
            if softcap:
                sdpa_reasons = _why_not_sdpa(model)
        if has_cache and sdpa:
            # RoPE becomes an intermediate RotaryEmbedding function, absorbed into GQA where possible.
            apply_rules(model, list(rotary_rules.rules))
            rotary, gqa_reasons = apply_rules(
                model, [RotaryGroupQueryAttentionRule.rule(r, self.max_positions) for r in (True, False)], expected=sdpa)
            plain, plain_reasons = apply_rules(
                model, [GroupQueryAttentionRule.rule(r) for r in (True, False)], expected=sdpa - rotary)
            gqa, gqa_reasons = rotary + plain, _rope_reasons(gqa_reasons) + plain_reasons
            InlinePass()(model)  # RoPE that was not absorbed goes back to plain ops
        mha, _ = apply_rules(model, list(sdpa_to_mha_rules.rules)) if sdpa > gqa else (0, [])
        if count_ops(model, "SDPA", "ai.onnxruntime._fusion"):
            raise KilnError("fuse-attention: an intermediate SDPA node could not be lowered to an ORT attention op")
        gqa += softcap
        stats = {"attentions_seen": seen, "sdpa_matched": sdpa, "gqa_fused": gqa, "gqa_with_rotary": rotary, "mha_fused": mha}
        if softcap:
            stats["gqa_with_softcap"] = softcap
        if repeats:
            stats["kv_head_repeats_made_explicit"] = repeats
        warnings = self.coverage("attention", sdpa + softcap, seen, sdpa_reasons)
        partial = [r for r in gqa_reasons if "part of each head" in r]
        if partial and gqa:
            warnings.append(f"RoPE stays outside GroupQueryAttention on {len(partial)} layer(s): {partial[0]}")
        if rotary:
            # ORT's fused rotary rotates the cached K of a padded first prompt by slot, not by
            # position_ids: runtimes must prefill one sequence at a time (decode batches fine).
            # Positions past the cos/sin caches cannot be rotated: runtimes must stop there.
            set_kv_layout(model, dataclasses.replace(kv_layout(model), padded_prefill=False,
                                                     max_positions=self.max_positions))
        if has_cache:
            warnings += self.coverage("GroupQueryAttention", gqa, sdpa + softcap, gqa_reasons)
            if gqa:
                # past every sliding window; left padding where the op's rotary does not forbid it
                windows = kv_layout(model).windows
                decode = decode_consistency(model, prefill=max([5, *(w + 4 for w in windows)]),
                                            pad=0 if rotary else 3)
                stats["decode_check_max_rel"] = float(f"{decode:.3g}")
                if decode > 1e-4:
                    raise KilnError(f"fuse-attention: decoding through the fused cache differs from full recompute "
                                    f"(max_rel {decode:.3g})")
            if gqa and gqa == seen:
                self._mark_shared_buffer(model, stats)
        return self.result(model, modified=sdpa + softcap + repeats > 0, stats=stats, rejected=sdpa_reasons + gqa_reasons,
                           warnings=warnings)

    @staticmethod
    def _mark_shared_buffer(model: ir.Model, stats: dict) -> None:
        """Every attention is GQA, whose present is max(past slots, T) long and keeps the past's
        layout: a runtime may then preallocate the cache and bind one buffer as both past and
        present, so a decode step writes one slot instead of copying the whole cache. Proven
        here on a buffer whose free slots hold random values."""
        try:
            shared = decode_consistency(model, capacity=16)
        except Exception:  # noqa: BLE001 - a graph that cannot take a longer past does not get the flag
            shared = float("inf")
        stats["shared_buffer_check_max_rel"] = float(f"{shared:.3g}")
        if shared <= 1e-4:
            set_kv_layout(model, dataclasses.replace(kv_layout(model), shared_buffer=True))

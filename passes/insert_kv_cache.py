"""Insert a KV cache into a full-sequence decoder graph, found by analysing its attention.

Before (exported without a cache):
    input_ids[B,S] -> ... Softmax(f(Q·Kᵀ) + mask/bias terms) · V ... -> logits[B,S,V]
After:
    inputs   input_ids[B,S]  attention_mask[B,T]  position_ids[B,S]
             past_key_values.{i}.key / .value [B,Hkv,P,Dh]
    outputs  logits[B,S,V]   present.{i}.key / .value [B,Hkv,T,Dh]          T = P + S
    per attention i:  K_i ← Concat(past_key_values.{i}.key, K_i, axis=2), same for V
    per attention i:  Softmax input ← f(Q·Kᵀ) + Where(allowed_i, bias_i, finfo.min)
        allowed_i[b,0,s,t] = t <= P + s  and  attention_mask[b,t]   (and t > P + s - W_i for a window W_i)
        bias_i[0,h,0,t]   = slope_i[h] * t for ALiBi, else 0
        f = the model's own scores ops without their mask/bias terms (scale, softcap tanh(x/c)*c, layout)
    the token-numbering Range(0, S) feeding the positional encoding ← position_ids, and so does
    any other integer [1|B, S] tensor computed from input_ids' shape alone whose value is 0..S-1
    in every row (probed numerically: e.g. OPT's cumsum(ones) - 1); a Reshape below it to a
    constant [1, ...] target of a tensor that was [1, ...] at export (GPT-J's sin/cos
    `[1, -1, 1, d]`) gets the batch as its leading dim, else batch 2 would fold into the sequence

How attentions are found and read: `kiln.passes.analysis.attention` (shared with fuse-attention and the
pruning passes). Each Softmax over a scores path from Q·Kᵀ is an attention; the mask/bias terms
on the path (structural tensors: computed from input_ids' shape only) are classified numerically
per attention, by evaluating the softmax input against the path without its terms on two
lengths (40, 72) and the terms alone on a long one (up to 4160): causal; causal + sliding window
W; causal + ALiBi slopes (per head, key position; per-row constants are dropped, which a softmax
ignores); the softcap is part of f. Nothing is read from names or configs. K and V: from each
MatMul operand the pass walks up through layout ops (Transpose, Reshape, Expand, Unsqueeze,
Squeeze, Cast, Identity, Mul/Div by a constant) and cuts at the highest tensor in the cache
layout [B, Hkv, S, Dh] (after RoPE, before any GQA head repeat), or else at the highest
[B, S, Hkv, Dh] one (RoPE applied before the head transpose, GPT-J; transposed into the cache
and back). Reshape/Expand targets below the cut computed from the input's sequence length are
rebuilt from the annotated shape with the total length T (one other dim, e.g. batch·heads, -1).

Static variant (`static_length=L`, for targets that need static shapes): the cache has a
fixed length L; a new input cache_position[S] gives the slots the new tokens are written to
(ScatterElements on the sequence axis), attention_mask is [B, L] and marks filled slots, and
present.{i}.* is the whole updated cache.

Positions are slots: causality, windows and ALiBi compare cache slots, padding is
attention_mask, and RoPE or learned position tables read position_ids, so left padding and rows
that join a batch later (continuous batching) are exact (ALiBi by slot differs from ALiBi by
position by a per-row constant, which a softmax ignores; windows count slots, as transformers does).

The layout is stored in the model's metadata as `kiln.kv_cache` (JSON), which the backend
copies into the manifest; with windows or ALiBi it lists them per layer under "attention".
The pass checks itself, so a misread form cannot pass silently:
  full_check_max_rel: the new graph's full sequence (mask all ones, positions 0..S-1) against
      the original graph on the same ids, S = max(48, every window + 8) (static: at most L);
  decode_check_max_rel: batch 2, row 1 left-padded by 3, a prefill longer than every window and
      3 decode steps through the cache against the full recompute, and the padded row against
      the plain one. Either over 1e-4 is an error.

Preconditions: a causal LM: one input `input_ids` [batch, S] with S symbolic, a per-token
first output, and (probed numerically) no dependence of earlier positions on later tokens.
With `only_causal_lm=true` other models are skipped with the reason (so one recipe serves
encoders and decoders); otherwise they are an error. Dims annotated by the exporter. All
attentions must be understood, else nothing changes and the first reason is raised in one line:
    pass 'insert-kv-cache': <feature> is not supported: <why>
Not handled (refused that way): models that already take a cache, cross-attention, any other
mask or bias (relative-position tables, bidirectional prefixes, a mask term before the softcap),
scores multiplied by a position-dependent tensor; windows longer than the long probe (4159) are
not seen as windows.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kiln.errors import KilnError
from kiln.ir import dims, kv_layout, set_kv_layout
from kiln.ir.values import descendants
from kiln.manifest import DEFAULT_PAST as PAST
from kiln.manifest import DEFAULT_PRESENT as PRESENT
from kiln.manifest import KVLayout, cache_names
from kiln.passes.analysis.attention import (
    PROBE_LENGTHS,
    Attention,
    MaskForm,
    Operand,
    classify_masks,
    content_values,
    find_attentions,
    neutral_scores,
    operand,
)
from kiln.passes.base import KilnPass
from kiln.passes.kv_layout import cache_feeds, decode_consistency, run_quiet
from kiln.passes.numerics import compare, evaluate_subgraph, run_ort
from kiln.passes.registry import register_pass


class KVCacheError(KilnError):
    pass


def _unsupported(feature: str, why: str) -> KVCacheError:
    return KVCacheError(f"pass 'insert-kv-cache': {feature} is not supported: {why}")


def _ancestors_read_shape_of(value: ir.Value, inside: set[ir.Value]) -> bool:
    """True if `value` is computed from the shape of a tensor outside `inside` (e.g. input_ids)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        p = v.producer()
        if p is None or p in seen:
            continue
        seen.add(p)
        if p.op_type in ("Shape", "Size"):
            if p.inputs[0] not in inside:
                return True
            continue  # only the shape of an inside value is read: fine
        stack.extend(i for i in p.inputs if i is not None)
    return False


def _not_a_causal_lm(model: ir.Model) -> str | None:
    """Why the graph is not a causal LM kiln can cache, or None.

    Structure: one input `input_ids` [batch, sequence] and a first output per token.
    Behaviour, probed numerically: changing the last token must not change the outputs
    at earlier positions (an encoder's bidirectional attention would).
    """
    graph = model.graph
    inputs = [v.name for v in graph.inputs]
    if inputs != ["input_ids"]:
        return f"expects exactly one input 'input_ids', found {inputs}"
    ids_dims, out_dims = dims(graph.inputs[0]), dims(graph.outputs[0])
    if not ids_dims or len(ids_dims) != 2 or not isinstance(ids_dims[1], str):
        return "'input_ids' is not [batch, sequence] with a symbolic sequence"
    if not out_dims or len(out_dims) < 2 or out_dims[1] != ids_dims[1]:
        return f"the first output ({out_dims}) is not per token"
    vocab = out_dims[-1] if isinstance(out_dims[-1], int) else 2
    ids = np.random.default_rng(2).integers(0, vocab, size=(2, 6))
    ids[1, :-1] = ids[0, :-1]
    ids[1, -1] = (ids[0, -1] + 1) % vocab
    out = next(iter(run_ort(model, {"input_ids": ids}).values()))
    if not np.allclose(out[0, :-1], out[1, :-1], rtol=1e-5, atol=1e-5 * float(np.abs(out).max())):
        return "outputs at earlier positions depend on later tokens (bidirectional attention)"
    return None


@register_pass("insert-kv-cache")
class InsertKVCachePass(KilnPass):
    def __init__(self, only_causal_lm: bool = False, static_length: int = 0):
        super().__init__()
        if static_length < 0:
            raise ValueError("static_length must be >= 0 (0: a growing cache)")
        self.only_causal_lm = only_causal_lm
        self.static_length = static_length

    def call(self, model: ir.Model):
        graph = model.graph
        if kv_layout(model) is not None:
            return self.result(model, modified=False, stats={"kv_layers": 0},
                               rejected=["the model already has a KV cache"])
        not_lm = _not_a_causal_lm(model)
        if not_lm is not None:
            if self.only_causal_lm:
                return self.result(model, modified=False, stats={"kv_layers": 0},
                                   rejected=[f"not a causal LM: {not_lm}; no cache inserted"])
            raise _unsupported("a model that is not a causal LM", f"not a causal LM: {not_lm}")
        ids = graph.inputs[0]
        batch_sym, seq = dims(ids)
        vocab = dims(graph.outputs[0])[-1]
        vocab = vocab if isinstance(vocab, int) else 2
        found = find_attentions(model)
        if not found:
            raise KVCacheError("pass 'insert-kv-cache': no attention (Softmax over Q·Kᵀ) in the graph")
        analysed: list[Attention | str] = []
        operands: list[tuple[Operand, Operand]] = []
        for softmax, att in found:
            if isinstance(att, Attention):
                key, value = operand(att.qk, 1, seq), operand(att.pv, 1, seq)
                att = f"K: {key}" if isinstance(key, str) else f"V: {value}" if isinstance(value, str) else att
                if isinstance(att, Attention):
                    operands.append((key, value))
            analysed.append(att)
        reasons = [f"attention {i} ({s.name}): {a}" for i, ((s, _), a) in enumerate(zip(found, analysed)) if isinstance(a, str)]
        if reasons:
            raise _unsupported("this attention form", f"{len(reasons)} of {len(found)} attentions not understood; {reasons[0]}")
        attentions: list[Attention] = analysed  # type: ignore[assignment]

        # What each attention's mask and bias mean, measured: the scores path without its
        # mask/bias terms (kept: it becomes the path below the new mask) against the original.
        content = content_values(graph)
        neutral, scratch = [], []
        for att in attentions:
            value, nodes = neutral_scores(graph, att, content)
            neutral.append(value)
            scratch.extend(nodes)
        try:
            forms = classify_masks(model, attentions, neutral, ids, vocab)
        except Exception as exc:  # noqa: BLE001 - the probe itself failed: refuse, in one line
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            why = why.split("Status Message:")[0].strip()[:160]
            forms = [f"the mask could not be evaluated on {PROBE_LENGTHS} tokens ({why})"] * len(attentions)
        bad = [(i, f) for i, f in enumerate(forms) if isinstance(f, str)]
        if bad:
            graph.remove(scratch, safe=True)
            i, why = bad[0]
            raise _unsupported("this attention mask", f"attention {i} ({attentions[i].softmax.name}): {why}"
                               + (f" ({len(bad)} of {len(forms)} attentions)" if len(bad) > 1 else ""))
        windows = [f.window for f in forms if f.window]
        check_length = max([48, *(w + 8 for w in windows)])
        if self.static_length:
            check_length = min(check_length, self.static_length)
        check_ids = np.random.default_rng(7).integers(0, vocab, size=(2, check_length))
        original = run_quiet(model, {"input_ids": check_ids})

        first = next(iter(graph))
        tape = ir.tape.Tape()
        static = self.static_length
        total_sym = static or "total_sequence"
        mask_in = ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT64),
                           shape=ir.Shape([batch_sym, total_sym]))
        pos_in = ir.Value(name="position_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([batch_sym, seq]))
        # Static cache: the new tokens are written at slots `cache_position` of a fixed-size cache.
        slot_in = ir.Value(name="cache_position", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([seq]))

        def const(array) -> ir.Value:
            return tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(array))})

        # Mask from slots: query s sits in slot P + s; it sees slot t if t <= P + s and t is not padding.
        seq_len = tape.op("Squeeze", [tape.op("Shape", [ids], attributes={"start": 1, "end": 2})])
        total_len = tape.op("Squeeze", [tape.op("Shape", [mask_in], attributes={"start": 1, "end": 2})])
        past_len = tape.op("Sub", [total_len, seq_len])
        one = const(np.int64(1))
        q_slots = slot_in if static else tape.op("Range", [past_len, total_len, one], name="kiln_query_slots")
        k_slots = tape.op("Range", [const(np.int64(0)), total_len, one], name="kiln_key_slots")
        causal = tape.op("LessOrEqual", [tape.op("Unsqueeze", [k_slots, const(np.array([0]))]),
                                         tape.op("Unsqueeze", [q_slots, const(np.array([1]))])])
        not_pad = tape.op("Cast", [tape.op("Unsqueeze", [mask_in, const(np.array([1, 2]))])],
                          attributes={"to": ir.DataType.BOOL})
        allowed = tape.op("And", [tape.op("Unsqueeze", [causal, const(np.array([0, 1]))]), not_pad])
        mask_shape = ir.Shape([batch_sym, 1, seq, total_sym])
        allowed.dtype, allowed.shape = ir.DataType.BOOL, mask_shape
        windowed: dict[int, ir.Value] = {}
        masks: dict[tuple, ir.Value] = {}

        def allowed_in(window: int | None) -> ir.Value:
            """allowed, and for a sliding window also t > P + s - window."""
            if not window:
                return allowed
            if window not in windowed:
                low = tape.op("Sub", [q_slots, const(np.int64(window))])
                inside = tape.op("Greater", [tape.op("Unsqueeze", [k_slots, const(np.array([0]))]),
                                             tape.op("Unsqueeze", [low, const(np.array([1]))])])
                windowed[window] = tape.op("And", [allowed, tape.op("Unsqueeze", [inside, const(np.array([0, 1]))])])
                windowed[window].dtype, windowed[window].shape = ir.DataType.BOOL, mask_shape
            return windowed[window]

        def additive(dtype: ir.DataType, form: MaskForm) -> ir.Value:
            """0 where allowed (or the ALiBi bias slope[h] * key slot), finfo.min elsewhere."""
            slopes = None if form.slopes is None else form.slopes.astype(np.float32)
            key = (dtype, form.window, None if slopes is None else slopes.tobytes())
            if key not in masks:
                np_dtype = dtype.numpy()
                shape = mask_shape
                if slopes is None:
                    keep = const(np.array(0, dtype=np_dtype))
                else:
                    slots = tape.op("Cast", [tape.op("Reshape", [k_slots, const(np.array([1, 1, 1, -1]))])],
                                    attributes={"to": dtype})
                    keep = tape.op("Mul", [const(slopes.reshape(1, -1, 1, 1).astype(np_dtype)), slots])
                    shape = ir.Shape([batch_sym, len(slopes), seq, total_sym])
                masks[key] = tape.op("Where", [allowed_in(form.window), keep,
                                               const(np.array(np.finfo(np_dtype).min, dtype=np_dtype))])
                masks[key].dtype, masks[key].shape = dtype, shape
            return masks[key]

        batch_1d = tape.op("Shape", [ids], attributes={"start": 0, "end": 1})
        layers = []
        past_names, present_names = cache_names(PAST, len(attentions)), cache_names(PRESENT, len(attentions))
        for i, (att, form, scores) in enumerate(zip(attentions, forms, neutral)):
            dtype = scores.dtype or ir.DataType.FLOAT
            add = ir.node("Add", [scores, additive(dtype, form)], num_outputs=1, name=f"kiln_mask_{i}")
            add.outputs[0].dtype, add.outputs[0].shape = dtype, att.softmax.inputs[0].shape
            graph.insert_before(att.softmax, add)
            att.softmax.replace_input_with(0, add.outputs[0])
            entry = {}
            for kind, op in zip(("key", "value"), operands[i]):
                heads, head_dim = op.heads, op.head_dim
                past = ir.Value(name=past_names[i][kind == "value"], type=ir.TensorType(op.cut.dtype),
                                shape=ir.Shape([batch_sym, heads, static or "past_sequence", head_dim]))
                new_nodes = []
                new = op.cut  # the new tokens' rows in the cache layout [B, Hkv, S, Dh]
                if op.layout == "bshd":  # RoPE was applied before the head transpose (GPT-J)
                    new_nodes.append(ir.node("Transpose", [op.cut], attributes={"perm": [0, 2, 1, 3]}, num_outputs=1))
                    new = new_nodes[-1].outputs[0]
                    new.dtype, new.shape = op.cut.dtype, ir.Shape([batch_sym, heads, seq, head_dim])
                if static:  # write the new rows at cache_position: ScatterElements on the sequence axis
                    where = ir.tape.Tape()
                    index = where.op("Expand", [where.op("Reshape", [slot_in, where.op("Constant", [], attributes={
                        "value": ir.tensor(np.array([1, 1, -1, 1], dtype=np.int64))})]), where.op("Shape", [new])])
                    writer = ir.node("ScatterElements", [past, index, new], attributes={"axis": 2}, num_outputs=1)
                    new_nodes += [*where.nodes, writer]
                else:
                    writer = ir.node("Concat", [past, new], attributes={"axis": 2}, num_outputs=1)
                    new_nodes.append(writer)
                full = writer.outputs[0]
                full.name = present_names[i][kind == "value"]
                full.dtype, full.shape = op.cut.dtype, ir.Shape([batch_sym, heads, total_sym, head_dim])
                back = full
                if op.layout == "bshd":
                    new_nodes.append(ir.node("Transpose", [full], attributes={"perm": [0, 2, 1, 3]}, num_outputs=1))
                    back = new_nodes[-1].outputs[0]
                    back.dtype, back.shape = op.cut.dtype, ir.Shape([batch_sym, total_sym, heads, head_dim])
                if op.cut.producer() is not None:
                    graph.insert_after(op.cut.producer(), new_nodes)
                else:
                    graph.insert_before(first, new_nodes)
                # Everything that read K (the chain and shape computations on it) now reads the
                # full-length K; only the writer (and its index shape) reads the new tokens.
                readers = {(n, j) for n in new_nodes for j, v in enumerate(n.inputs) if v is op.cut}
                op.cut.replace_all_uses_with(back)
                for n, j in readers:
                    n.replace_input_with(j, op.cut)
                if back is not full:  # Transpose(back, p) = Transpose(present, composed): no round trip
                    for use in list(back.uses()):
                        if use.node.op_type == "Transpose" and use.node in op.below:
                            perm = use.node.attributes.get_ints("perm", None)
                            if perm is not None and len(perm) == 4:
                                use.node.attributes["perm"] = ir.AttrInt64s("perm", [(0, 2, 1, 3)[p] for p in perm])
                                use.node.replace_input_with(0, full)
                graph.inputs.append(past)
                graph.outputs.append(full)
                self._retarget_shapes(graph, op, full, back, batch_1d, batch_sym, seq)
                entry[kind] = {"heads": heads, "head_dim": head_dim}
            layers.append(entry)

        graph.insert_before(first, tape.nodes)
        graph.inputs.insert(1, mask_in)
        graph.inputs.insert(2, pos_in)
        if static:
            graph.inputs.insert(3, slot_in)
        RemoveUnusedNodesPass()(model)
        positions, rejected = self._replace_positions(graph, pos_in)
        positions += self._replace_counted_positions(model, pos_in)
        rebatched = self._rebatch_positions(graph, pos_in, batch_sym) if positions else 0
        RemoveUnusedNodesPass()(model)

        kv_heads = layers[0]["key"]["heads"]
        head_dim = layers[0]["key"]["head_dim"]
        notes = {  # commentary for readers of the manifest
            "layout": "batch, kv_heads, sequence, head_dim",
            "attention_mask": "attention_mask: int64 [batch, past + sequence], 1 = real token, 0 = padding",
            "position_ids": "position_ids: int64 [batch, sequence], each token's position (count of real tokens before it)",
        }
        if static:
            notes.update({
                "attention_mask": "attention_mask: int64 [batch, max_length], 1 = a filled slot (including the new tokens)",
                "cache_position": "cache_position: int64 [sequence], the slots the new tokens are written to",
            })
        if windows or any(f.slopes is not None for f in forms):
            notes["attention"] = [{"window": f.window, "alibi": f.slopes is not None} for f in forms]
        layout = KVLayout(
            num_layers=len(layers), kv_heads=kv_heads, head_dim=head_dim, value_head_dim=layers[0]["value"]["head_dim"],
            dtype=operands[0][0].cut.dtype.name.lower(), past=PAST,
            present=PRESENT + (": the whole cache, [batch, kv_heads, max_length, head_dim]" if static else ""),
            static=bool(static), max_length=static or None, extra=notes)
        set_kv_layout(model, layout)
        # Self-checks, each one that would have caught a wrong mask or position:
        # 1. the full sequence (mask all ones, positions 0..S-1, S longer than every window)
        #    equals the original graph;
        # 2. batch 2, row 1 left-padded: prefill longer than every window + decode steps
        #    through the cache equal the full recompute, and the padded row equals the plain one.
        prefill = max([5, *(w + 4 for w in windows)])
        if static:
            prefill = max(1, min(prefill, static - 3))
        try:
            got = run_quiet(model, cache_feeds(layout, check_ids))
            decode = decode_consistency(model, prefill=prefill, steps=3, pad=3)
        except Exception as exc:  # one line, no ORT log before it
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KVCacheError(f"pass 'insert-kv-cache': the cached graph does not run at batch 2: {why[:300]}") from exc
        full_check = compare({"out": original[graph.outputs[0].name]}, {"out": got[graph.outputs[0].name]})["max_rel"]
        stats = {"attentions_seen": len(found), "kv_layers": len(layers), "positions_replaced": positions,
                 "full_check_length": check_length, "full_check_max_rel": float(f"{full_check:.3g}"),
                 "decode_check_max_rel": float(f"{decode:.3g}")}
        if windows:
            stats["sliding_window_layers"] = len(windows)
        if any(f.slopes is not None for f in forms):
            stats["alibi_layers"] = sum(f.slopes is not None for f in forms)
        if any(a.softcap for a in attentions):
            stats["softcap_layers"] = sum(a.softcap for a in attentions)
        if rebatched:
            stats["position_reshapes_rebatched"] = rebatched
        if full_check > 1e-4:
            raise KVCacheError(f"pass 'insert-kv-cache': the cached graph differs from the original on {check_length} "
                               f"tokens (max_rel {full_check:.3g}): an attention form was misread")
        if decode > 1e-4:
            raise KVCacheError(f"pass 'insert-kv-cache': decoding through the cache differs from full recompute "
                               f"(max_rel {decode:.3g})")
        return self.result(model, modified=True, stats=stats, rejected=rejected)

    @staticmethod
    def _retarget_shapes(graph, op: Operand, full: ir.Value, back: ir.Value, batch_1d, batch_sym, seq) -> None:
        """Reshape/Expand targets below the cut that were computed from the input's length S
        become the annotated shape with T = the concatenated length (one other dim, e.g.
        batch·heads, becomes -1)."""
        inside = {full, back} | {o for n in op.below for o in n.outputs}
        for node in op.below:
            if node.op_type not in ("Reshape", "Expand"):
                continue
            target = node.inputs[1]
            if not _ancestors_read_shape_of(target, inside):
                continue
            shape = dims(node.outputs[0])
            unknown = [d for d in shape or [] if d not in (batch_sym, seq) and not isinstance(d, int)]
            if shape is None or len(unknown) > 1 or (unknown and node.op_type != "Reshape"):
                raise _unsupported("this K/V layout", f"cannot retarget {node.op_type} '{node.name}' (output shape {shape})")
            shape = [-1 if d in unknown else d for d in shape]
            tape = ir.tape.Tape()
            total_1d = tape.op("Shape", [full], attributes={"start": 2, "end": 3})
            parts = [batch_1d if d == batch_sym else total_1d if d == seq else
                     tape.op("Constant", [], attributes={"value": ir.tensor(np.array([d], dtype=np.int64))}) for d in shape]
            new_target = tape.op("Concat", parts, attributes={"axis": 0})
            graph.insert_before(node, tape.nodes)
            node.replace_input_with(1, new_target)
            for out in node.outputs:
                if out.shape is not None:
                    out.shape = ir.Shape(["total_sequence" if d == seq else old for d, old in zip(dims(out), out.shape)])

    @staticmethod
    def _rebatch_positions(graph, pos_in: ir.Value, batch_sym) -> int:
        """A Reshape below position_ids to a constant target with a leading 1, of a tensor that
        was [1, ...] at export (the [1, S] token counter's batch, e.g. GPT-J's sin/cos
        `[1, -1, 1, d]`), would fold a batch of B into the next axis once positions are
        [B, S]: its leading target dim becomes the input's dim 0. Returns how many."""
        done = 0
        below_positions = descendants([pos_in])
        for node in [n for n in graph if n in below_positions]:
            if node.op_type != "Reshape" or node.inputs[1] is None or node.inputs[1].const_value is None:
                continue
            target = node.inputs[1].const_value.numpy().reshape(-1)
            shape = dims(node.inputs[0])
            if len(target) < 2 or target[0] != 1 or not shape or shape[0] != 1:
                continue
            tape = ir.tape.Tape()
            lead = tape.op("Shape", [node.inputs[0]], attributes={"start": 0, "end": 1})
            rest = tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(target[1:], dtype=np.int64))})
            graph.insert_before(node, tape.nodes)
            concat = ir.node("Concat", [lead, rest], attributes={"axis": 0}, num_outputs=1)
            graph.insert_before(node, concat)
            node.replace_input_with(1, concat.outputs[0])
            done += 1
        # The position-only values (below position_ids, not below the token ids) were annotated
        # with the export's batch of 1: their batch is now B. Left at 1, a later constant fold
        # would read Shape(...)[0] = 1 from the annotation and bring the fold back.
        below_ids = descendants([graph.inputs[0]])
        for node in below_positions - below_ids:
            for out in node.outputs:
                if out.shape is not None and len(out.shape) >= 2 and out.shape[0] == 1 and not out.is_graph_output():
                    out.shape = ir.Shape([batch_sym, *list(out.shape)[1:]])
        return done

    @staticmethod
    def _replace_positions(graph, pos_in: ir.Value) -> tuple[int, list[str]]:
        """Range(0, S) -> Unsqueeze(axis 0) numbers the tokens for RoPE / position tables: use position_ids."""
        replaced, rejected = 0, []
        for node in [n for n in graph if n.op_type == "Range"]:
            if node.name.startswith("kiln_"):
                continue
            out = node.outputs[0]
            uses = list(out.uses())
            unsqueezes = [u.node for u in uses if u.node.op_type == "Unsqueeze"
                          and u.node.inputs[1] is not None and u.node.inputs[1].const_value is not None
                          and list(u.node.inputs[1].const_value.numpy().reshape(-1)) == [0]]
            if len(unsqueezes) != len(uses) or not unsqueezes:
                rejected.append(f"Range '{node.name}' is not a token-position range (used by "
                                f"{sorted({u.node.op_type for u in uses})}); left as is")
                continue
            for u in unsqueezes:
                target = pos_in
                if out.dtype not in (None, ir.DataType.INT64):
                    cast = ir.node("Cast", [pos_in], attributes={"to": out.dtype}, num_outputs=1)
                    graph.insert_before(u, cast)
                    target = cast.outputs[0]
                u.outputs[0].replace_all_uses_with(target)
                replaced += 1
        return replaced, rejected

    @staticmethod
    def _replace_counted_positions(model: ir.Model, pos_in: ir.Value) -> int:
        """Positions computed some other way (OPT: cumsum of an all-ones mask, minus one): every
        integer [1 or B, S] tensor computed from the shape of input_ids alone whose value is
        0..S-1 in every row, for two lengths and two token contents (probed numerically), is
        replaced by position_ids; the first such tensor of a chain is enough."""
        graph = model.graph
        input_ids = graph.inputs[0]
        integer = (ir.DataType.INT64, ir.DataType.INT32)
        sources: dict[ir.Value, set[ir.Value]] = {}
        for node in graph:
            deps: set[ir.Value] = set()
            for v in node.inputs:
                if v is not None:
                    deps |= {v} if v.is_graph_input() else sources.get(v, set())
            for out in node.outputs:
                sources[out] = deps
        candidates = [v for v, deps in sources.items() if deps == {input_ids} and v.dtype in integer
                      and v.shape is not None and len(v.shape) == 2 and list(v.uses())]
        if not candidates:
            return 0
        rng = np.random.default_rng(3)
        probes = [rng.integers(0, 100, size=(2, s)) for s in (5, 7, 7)]
        runs = [evaluate_subgraph(model, {input_ids: ids}, candidates) for ids in probes]
        counted = [v for i, v in enumerate(candidates)
                   if all(r[i].shape[0] in (1, ids.shape[0]) and r[i].shape[1] == ids.shape[1]
                          and np.array_equal(r[i], np.broadcast_to(np.arange(ids.shape[1]), r[i].shape))
                          for r, ids in zip(runs, probes))]
        replaced = 0
        for v in counted:
            producer = v.producer()
            if producer is not None and any(i in counted for i in producer.inputs):
                continue  # below another counted tensor: replaced with it
            target = pos_in
            if v.dtype != ir.DataType.INT64:
                cast = ir.node("Cast", [pos_in], attributes={"to": v.dtype}, num_outputs=1)
                graph.insert_after(producer, cast)
                target = cast.outputs[0]
            v.replace_all_uses_with(target)
            replaced += 1
        return replaced

    def adapt_feeds(self, feeds: dict[str, np.ndarray], model: ir.Model) -> dict[str, np.ndarray]:
        layout = kv_layout(model)
        if layout is None or layout.past_names[0][0] in feeds:
            return feeds
        return cache_feeds(layout, feeds["input_ids"])

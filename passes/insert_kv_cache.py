"""Insert a KV cache into a full-sequence decoder graph, found by analysing its attention.

Before (exported without a cache):
    input_ids[B,S] -> ... Softmax(Q·Kᵀ·scale + mask[·,·,S,S]) · V ... -> logits[B,S,V]
After:
    inputs   input_ids[B,S]  attention_mask[B,T]  position_ids[B,S]
             past_key_values.{i}.key / .value [B,Hkv,P,Dh]
    outputs  logits[B,S,V]   present.{i}.key / .value [B,Hkv,T,Dh]          T = P + S
    per attention i:  K_i ← Concat(past_key_values.{i}.key, K_i, axis=2), same for V
    every attention mask ← Where(allowed, 0, finfo.min),
        allowed[b,0,s,t] = (t <= P + s) and attention_mask[b,t]
    the token-numbering Range(0, S) feeding the positional encoding ← position_ids, and so does
    any other integer [1|B, S] tensor computed from input_ids' shape alone whose value is 0..S-1
    in every row (probed numerically: e.g. OPT's cumsum(ones) - 1)

How K and V are found (no names, no per-architecture code): every Softmax whose input is
a MatMul (Q·Kᵀ, possibly scaled, plus an additive mask or inside a Where) is an attention;
the MatMul that consumes the probabilities gives V. From each MatMul operand the pass walks
up through layout ops (Transpose, Reshape, Expand, Unsqueeze, Squeeze, Cast, Identity,
Mul/Div by a constant) and cuts at the highest tensor in the cache layout [B, Hkv, S, Dh]:
after RoPE (the Mul/Add that applies it is not a layout op) and before any GQA head repeat
(Unsqueeze/Expand/Reshape to H heads). Reshape/Expand targets below the cut that were
computed from the input's sequence length are rebuilt from the value's annotated shape
with the total length T.

Static variant (`static_length=L`, for targets that need static shapes): the cache has a
fixed length L; a new input cache_position[S] gives the slots the new tokens are written to
(ScatterElements on the sequence axis), attention_mask is [B, L] and marks filled slots, and
present.{i}.* is the whole updated cache.

Positions are slots: causality compares cache slots, padding is attention_mask, and RoPE
or learned position tables read position_ids, so left padding and rows that join a batch
later (continuous batching) are exact.

The layout is stored in the model's metadata as `kiln.kv_cache` (JSON), which the backend
copies into the manifest. The pass checks itself: prefill + step-by-step decode through
the cache must reproduce full-sequence logits (stats: decode_check_max_rel).

Preconditions: a causal LM: one input `input_ids` [batch, S] with S symbolic, a per-token
first output, and (probed numerically) no dependence of earlier positions on later tokens.
With `only_causal_lm=true` other models are skipped with the reason (so one recipe serves
encoders and decoders); otherwise they are an error. Dims annotated by the exporter. All
attentions must be understood, else nothing changes and the reasons are raised. Not handled: models that already take a cache, sliding-window
or ALiBi masks (their mask is replaced by a plain causal one: wrong for them), cross-attention.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kiln.errors import KilnError
from kiln.ir import KV_CACHE_METADATA as METADATA_KEY
from kiln.passes.base import KilnPass
from kiln.passes.kv_layout import cache_feeds, decode_consistency
from kiln.passes.numerics import evaluate_subgraph, run_ort
from kiln.passes.registry import register_pass

LAYOUT_OPS = {"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Cast", "Identity"}
SCALE_OPS = {"Mul", "Div"}


class KVCacheError(KilnError):
    pass


@dataclasses.dataclass
class _Operand:
    """One K or V operand of an attention: the cut value and the chain below it."""

    cut: ir.Value
    consumer: ir.Node  # first node below the cut on the way to the attention MatMul
    index: int  # input index of the cut in `consumer`
    below: list[ir.Node]  # nodes between the cut and the MatMul (inclusive of consumer)


@dataclasses.dataclass
class _Attention:
    softmax: ir.Node
    mask_use: tuple[ir.Node, int] | None  # where the mask enters
    mask_kind: str  # "additive" | "boolean" | "none"
    scores: ir.Value  # Q·Kᵀ (scaled), without the mask
    key: _Operand
    value: _Operand


def _is_const(value: ir.Value | None) -> bool:
    if value is None:
        return False
    producer = value.producer()
    return value.const_value is not None or (producer is not None and producer.op_type == "Constant")


def _scaled_input(node: ir.Node) -> ir.Value | None:
    """For Mul/Div by a constant, the non-constant operand; else None."""
    if node.op_type not in SCALE_OPS or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if _is_const(b) and not _is_const(a):
        return a
    if node.op_type == "Mul" and _is_const(a) and not _is_const(b):
        return b
    return None


def _skip_scale(value: ir.Value) -> ir.Value:
    while (p := value.producer()) is not None and (inner := _scaled_input(p)) is not None:
        value = inner
    return value


def _dims(value: ir.Value) -> list | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None) for d in value.shape]


def _operand(matmul: ir.Node, index: int, seq: str) -> _Operand | str:
    """Walk up from matmul.inputs[index] through layout ops; cut at the top [B, Hkv, S, Dh] tensor."""
    chain: list[tuple[ir.Value, ir.Node, int]] = []  # (value, its consumer on the chain, input index)
    value, consumer, idx = matmul.inputs[index], matmul, index
    while True:
        chain.append((value, consumer, idx))
        producer = value.producer()
        if producer is None:
            break
        if producer.op_type in LAYOUT_OPS:
            value, consumer, idx = producer.inputs[0], producer, 0
        elif (inner := _scaled_input(producer)) is not None:
            value, consumer, idx = inner, producer, list(producer.inputs).index(inner)
        else:
            break
    for pos in range(len(chain) - 1, -1, -1):
        value, consumer, idx = chain[pos]
        dims = _dims(value)
        if dims and len(dims) == 4 and dims[2] == seq and isinstance(dims[1], int) and isinstance(dims[3], int):
            below = [c for _, c, _ in chain[: pos + 1]]
            return _Operand(value, consumer, idx, below)
    return f"no [batch, heads, {seq}, head_dim] tensor between the projection and the attention MatMul"


def _probabilities_matmul(softmax: ir.Node) -> ir.Node | None:
    """The MatMul that consumes the attention probabilities (through Where/Cast/IsNaN guards)."""
    frontier, seen = [softmax.outputs[0]], set()
    for _ in range(4):
        nxt = []
        for value in frontier:
            for use in value.uses():
                node = use.node
                if node in seen:
                    continue
                seen.add(node)
                if node.op_type == "MatMul" and use.idx == 0:
                    return node
                if node.op_type in ("Where", "Cast", "Identity", "Dropout"):
                    nxt.extend(node.outputs[:1])
        frontier = nxt
    return None


def _analyse(softmax: ir.Node, seq: str) -> _Attention | str:
    x = softmax.inputs[0]
    producer = x.producer()
    mask_use, kind, scores = None, "none", x
    if producer is not None and producer.op_type == "Add":
        for i in (0, 1):
            p = _skip_scale(producer.inputs[i]).producer()
            if p is not None and p.op_type == "MatMul":
                scores, mask_use, kind = producer.inputs[i], (producer, 1 - i), "additive"
                break
    elif producer is not None and producer.op_type == "Where":
        scores, mask_use, kind = producer.inputs[1], (producer, 0), "boolean"
    qk = _skip_scale(scores).producer()
    if qk is None or qk.op_type != "MatMul":
        return "softmax input is not a (scaled) MatMul of Q and K"
    pv = _probabilities_matmul(softmax)
    if pv is None:
        return "no MatMul consumes the attention probabilities"
    key = _operand(qk, 1, seq)
    if isinstance(key, str):
        return f"K: {key}"
    value = _operand(pv, 1, seq)
    if isinstance(value, str):
        return f"V: {value}"
    return _Attention(softmax, mask_use, kind, scores, key, value)


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
    ids_dims, out_dims = _dims(graph.inputs[0]), _dims(graph.outputs[0])
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
        if METADATA_KEY in model.metadata_props:
            return self.result(model, modified=False, stats={"kv_layers": 0},
                               rejected=["the model already has a KV cache"])
        not_lm = _not_a_causal_lm(model)
        if not_lm is not None:
            if self.only_causal_lm:
                return self.result(model, modified=False, stats={"kv_layers": 0},
                                   rejected=[f"not a causal LM: {not_lm}; no cache inserted"])
            raise KVCacheError(f"insert-kv-cache: not a causal LM: {not_lm}")
        ids = graph.inputs[0]
        batch_sym, seq = _dims(ids)
        softmaxes = [n for n in graph if n.op_type == "Softmax"]
        found = [_analyse(s, seq) for s in softmaxes]
        reasons = [f"attention {i} ({s.name}): {a}" for i, (s, a) in enumerate(zip(softmaxes, found)) if isinstance(a, str)]
        if not softmaxes:
            raise KVCacheError("insert-kv-cache: no attention (Softmax over Q·Kᵀ) in the graph")
        if reasons:
            raise KVCacheError(f"insert-kv-cache: {len(reasons)} of {len(softmaxes)} attentions not understood; {reasons[0]}")
        attentions: list[_Attention] = found  # type: ignore[assignment]

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
        masks: dict[ir.DataType, ir.Value] = {}

        def additive(dtype: ir.DataType) -> ir.Value:
            if dtype not in masks:
                np_dtype = dtype.numpy()
                masks[dtype] = tape.op("Where", [allowed, const(np.array(0, dtype=np_dtype)),
                                                 const(np.array(np.finfo(np_dtype).min, dtype=np_dtype))])
                masks[dtype].dtype, masks[dtype].shape = dtype, mask_shape
            return masks[dtype]

        batch_1d = tape.op("Shape", [ids], attributes={"start": 0, "end": 1})
        layers = []
        for i, att in enumerate(attentions):
            dtype = att.scores.dtype or ir.DataType.FLOAT
            if att.mask_kind == "additive":
                att.mask_use[0].replace_input_with(att.mask_use[1], additive(dtype))
            elif att.mask_kind == "boolean":
                att.mask_use[0].replace_input_with(att.mask_use[1], allowed)
            else:
                add = ir.node("Add", [att.scores, additive(dtype)], num_outputs=1)
                graph.insert_before(att.softmax, add)
                att.softmax.replace_input_with(0, add.outputs[0])
            entry = {}
            for kind, op in (("key", att.key), ("value", att.value)):
                b, heads, _, head_dim = _dims(op.cut)
                past = ir.Value(name=f"past_key_values.{i}.{kind}", type=ir.TensorType(op.cut.dtype),
                                shape=ir.Shape([batch_sym, heads, static or "past_sequence", head_dim]))
                if static:  # write the new rows at cache_position: ScatterElements on the sequence axis
                    where = ir.tape.Tape()
                    index = where.op("Expand", [where.op("Reshape", [slot_in, where.op("Constant", [], attributes={
                        "value": ir.tensor(np.array([1, 1, -1, 1], dtype=np.int64))})]), where.op("Shape", [op.cut])])
                    writer = ir.node("ScatterElements", [past, index, op.cut], attributes={"axis": 2}, num_outputs=1)
                    new_nodes = [*where.nodes, writer]
                else:
                    writer = ir.node("Concat", [past, op.cut], attributes={"axis": 2}, num_outputs=1)
                    new_nodes = [writer]
                full = writer.outputs[0]
                full.name = f"present.{i}.{kind}"
                full.dtype, full.shape = op.cut.dtype, ir.Shape([batch_sym, heads, total_sym, head_dim])
                if op.cut.producer() is not None:
                    graph.insert_after(op.cut.producer(), new_nodes)
                else:
                    graph.insert_before(first, new_nodes)
                # Everything that read K (the chain and shape computations on it) now reads the
                # full-length K; only the writer (and its index shape) reads the new tokens.
                readers = {(n, j) for n in new_nodes for j, v in enumerate(n.inputs) if v is op.cut}
                op.cut.replace_all_uses_with(full)
                for n, j in readers:
                    n.replace_input_with(j, op.cut)
                graph.inputs.append(past)
                graph.outputs.append(full)
                self._retarget_shapes(graph, op, full, batch_1d, batch_sym, seq)
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
        RemoveUnusedNodesPass()(model)

        kv_heads = layers[0]["key"]["heads"]
        head_dim = layers[0]["key"]["head_dim"]
        layout = {
            "num_layers": len(layers),
            "layout": "batch, kv_heads, sequence, head_dim",
            "sequence_axis": 2,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "value_head_dim": layers[0]["value"]["head_dim"],
            "dtype": attentions[0].key.cut.dtype.name.lower(),
            "past": "past_key_values.{layer}.{key|value}",
            "present": "present.{layer}.{key|value}",
            "attention_mask": "attention_mask: int64 [batch, past + sequence], 1 = real token, 0 = padding",
            "position_ids": "position_ids: int64 [batch, sequence], each token's position (count of real tokens before it)",
            "static": bool(static),
        }
        if static:
            layout.update({
                "max_length": static,
                "attention_mask": "attention_mask: int64 [batch, max_length], 1 = a filled slot (including the new tokens)",
                "cache_position": "cache_position: int64 [sequence], the slots the new tokens are written to",
                "present": "present.{layer}.{key|value}: the whole cache, [batch, kv_heads, max_length, head_dim]",
            })
        model.metadata_props[METADATA_KEY] = json.dumps(layout)
        decode = decode_consistency(model)
        stats = {"attentions_seen": len(softmaxes), "kv_layers": len(layers), "positions_replaced": positions,
                 "decode_check_max_rel": float(f"{decode:.3g}")}
        if decode > 1e-4:
            raise KVCacheError(f"insert-kv-cache: decoding through the cache differs from full recompute (max_rel {decode:.3g})")
        return self.result(model, modified=True, stats=stats, rejected=rejected)

    @staticmethod
    def _retarget_shapes(graph, op: _Operand, full: ir.Value, batch_1d, batch_sym, seq) -> None:
        """Reshape/Expand targets below the cut that were computed from the input's length S
        become the annotated shape with T = the concatenated length."""
        inside = {full} | {o for n in op.below for o in n.outputs}
        for node in op.below:
            if node.op_type not in ("Reshape", "Expand"):
                continue
            target = node.inputs[1]
            if not _ancestors_read_shape_of(target, inside):
                continue
            dims = _dims(node.outputs[0])
            if dims is None or any(d not in (batch_sym, seq) and not isinstance(d, int) for d in dims):
                raise KVCacheError(f"insert-kv-cache: cannot retarget {node.op_type} '{node.name}' (output shape {dims})")
            tape = ir.tape.Tape()
            total_1d = tape.op("Shape", [full], attributes={"start": 2, "end": 3})
            parts = [batch_1d if d == batch_sym else total_1d if d == seq else
                     tape.op("Constant", [], attributes={"value": ir.tensor(np.array([d], dtype=np.int64))}) for d in dims]
            new_target = tape.op("Concat", parts, attributes={"axis": 0})
            graph.insert_before(node, tape.nodes)
            node.replace_input_with(1, new_target)
            for out in node.outputs:
                if out.shape is not None:
                    out.shape = ir.Shape(["total_sequence" if d == seq else d for d in dims])

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
        if METADATA_KEY not in model.metadata_props or "past_key_values.0.key" in feeds:
            return feeds
        return cache_feeds(json.loads(model.metadata_props[METADATA_KEY]), feeds["input_ids"])

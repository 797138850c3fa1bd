"""Attention analysis shared by insert-kv-cache, fuse-attention and the pruning passes
(through `kiln.passes.analysis.attention_blocks`): found from the graph, never from names or configs.

An attention is a Softmax whose input is reached from a MatMul of two *content* tensors
(Q·Kᵀ) through a chain of score ops, and whose probabilities are consumed by a MatMul (·V).
Content is what depends on the token ids (or the float cache inputs) through data edges; a
value that depends on them only through Shape/Size is *structural* (masks, position biases).

The scores path, walked from the Softmax down to Q·Kᵀ, may hold:
    layout ops (Transpose, Reshape, Unsqueeze, Squeeze, Cast, Identity, Expand)
    Mul/Div by a constant (scale), Tanh (softcap: tanh(x / cap) * cap), Add/Sub of a constant
    Add/Sub of a structural tensor, Where(structural condition, scores, other)   -> mask/bias terms
Terms must enter above (after) every non-linear op (Tanh), so that the path without its
terms plus one additive term at the Softmax is the same function.

`classify_masks` finds what the terms mean numerically, per attention: it builds the path
without its terms (`neutral`, the same ops on Q·Kᵀ) and evaluates D = softmax input - neutral
on random ids of two lengths, then
    allowed = D > -1e4                         (masked entries are finfo.min or -inf)
    allowed[s, t] == (t <= s)                  -> causal
    allowed[s, t] == (t <= s and t > s - W)    -> causal sliding window W (W found from the
                                                  last row; confirmed on a second length)
    D[h, s, t] == slope[h] * t + c[h, s] on the allowed entries, slope != 0  -> ALiBi slopes
The structural terms alone are also evaluated on one long sequence (`WINDOW_PROBE` tokens) to
find windows longer than the first probe. Anything else is refused with a reason.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir

from kiln.ir import dims
from kiln.ir.values import is_const
from kiln.passes.numerics import evaluate_subgraph

LAYOUT_OPS = {"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Cast", "Identity"}
SCALE_OPS = {"Mul", "Div"}
SHAPE_ONLY_OPS = {"Shape", "Size", "ConstantOfShape", "EyeLike"}
MASKED_BELOW = -1e4  # an additive term below this is a masked entry
PROBE_LENGTHS = (40, 72)  # the first is long enough for the windows of tiny test models
WINDOW_PROBE = 4160  # the terms alone, for windows up to 4159 tokens (halved while the model cannot run it)


def _evaluate(model: ir.Model, feeds: dict, outputs: list[ir.Value]) -> list[np.ndarray]:
    """evaluate_subgraph without ORT's own log lines: a failed probe is reported by the caller."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    try:
        return evaluate_subgraph(model, feeds, outputs)
    finally:
        ort.set_default_logger_severity(2)


@dataclasses.dataclass
class Operand:
    """One K or V operand of an attention: the cut value and the chain below it.

    layout "bhsd": the cut is [B, Hkv, S, Dh]; "bshd": [B, S, Hkv, Dh] (RoPE applied before
    the head transpose, e.g. GPT-J)."""

    cut: ir.Value
    consumer: ir.Node  # first node below the cut on the way to the attention MatMul
    index: int  # input index of the cut in `consumer`
    below: list[ir.Node]  # nodes between the cut and the MatMul (inclusive of consumer)
    layout: str = "bhsd"

    @property
    def heads(self) -> int:
        return dims(self.cut)[1 if self.layout == "bhsd" else 2]

    @property
    def head_dim(self) -> int:
        return dims(self.cut)[3]


@dataclasses.dataclass
class Attention:
    softmax: ir.Node
    qk: ir.Node  # the Q·Kᵀ MatMul
    pv: ir.Node  # the P·V MatMul
    path: list[ir.Node]  # score ops from qk (exclusive) to the Softmax (exclusive), bottom-up
    terms: list[tuple[ir.Node, int]]  # structural mask/bias inputs on the path

    @property
    def scores(self) -> ir.Value:
        return self.qk.outputs[0]

    @property
    def softcap(self) -> bool:
        return any(n.op_type == "Tanh" for n in self.path)


@dataclasses.dataclass
class MaskForm:
    window: int | None = None  # a query sees keys t with s - window < t <= s
    slopes: np.ndarray | None = None  # ALiBi: bias slope[h] * key slot, shape [H]


def content_roots(graph: ir.Graph) -> set[ir.Value]:
    """Float inputs (hidden states, caches) and integer inputs used (through layout ops) as
    embedding-lookup indices: the token ids."""
    roots = set()
    for v in graph.inputs:
        if v.dtype is not None and v.dtype.is_floating_point():
            roots.add(v)
            continue
        frontier = [v]
        for _ in range(6):
            nxt = []
            for x in frontier:
                for u in x.uses():
                    node = u.node
                    table = node.inputs[0]
                    if node.op_type == "Gather" and u.idx == 1 and table is not None and table.dtype is not None \
                            and table.dtype.is_floating_point():
                        roots.add(v)
                    elif node.op_type in LAYOUT_OPS or node.op_type == "Flatten":
                        nxt.extend(node.outputs[:1])
            frontier = nxt
    return roots


def content_values(graph: ir.Graph) -> set[ir.Value]:
    """Values that depend on the content roots through data edges (not through Shape/Size)."""
    content = set(content_roots(graph))
    for node in graph:
        if node.op_type in SHAPE_ONLY_OPS:
            continue
        data = node.inputs[:1] if node.op_type == "CastLike" else node.inputs  # CastLike reads only a type
        if any(i is not None and i in content for i in data):
            content.update(node.outputs)
    return content


def probabilities_matmul(softmax: ir.Node) -> ir.Node | None:
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
                if node.op_type in ("Where", "Cast", "Identity", "Dropout", "Reshape", "Squeeze", "Unsqueeze"):
                    nxt.extend(node.outputs[:1])
        frontier = nxt
    return None


def score_path(softmax: ir.Node, content: set[ir.Value]) -> tuple[ir.Node, list[ir.Node], list[tuple[ir.Node, int]]] | str:
    """(Q·Kᵀ MatMul, score ops bottom-up, structural terms) of a Softmax, or why not."""
    value, path, terms, nonlinear = softmax.inputs[0], [], [], None
    for _ in range(64):
        node = value.producer()
        if node is None:
            return "softmax input is not a (scaled) MatMul of Q and K"
        data = [i for i, x in enumerate(node.inputs) if x is not None and x in content]
        if node.op_type == "MatMul" and len(data) == 2:
            path.reverse()
            terms.reverse()
            return node, path, terms
        if len(data) != 1:
            return f"softmax input is not a (scaled) MatMul of Q and K ({node.op_type} of {len(data)} content inputs)"
        (idx,) = data
        others = [(i, x) for i, x in enumerate(node.inputs) if i != idx and x is not None]
        structural = [(i, x) for i, x in others if not is_const(x)]
        op = node.op_type
        if op in LAYOUT_OPS:
            if idx != 0:
                return f"scores are the shape operand of a {op}"
        elif op in SCALE_OPS:
            if structural:
                return "the scores are multiplied by a position-dependent tensor"
            if op == "Div" and idx != 0:
                return "the scores are a divisor"
        elif op == "Tanh":
            nonlinear = nonlinear or op
        elif op in ("Add", "Sub"):
            if op == "Sub" and idx != 0:
                return "the scores are subtracted from a term"
            if structural:
                if nonlinear:
                    return f"a mask or bias term is applied before a {nonlinear} on the scores"
                terms.append((node, structural[0][0]))
        elif op == "Where":
            if idx == 0:
                return "the scores are a Where condition"
            if nonlinear:
                return f"a mask is applied before a {nonlinear} on the scores"
            terms.append((node, 0))
        else:
            return f"softmax input is not a (scaled) MatMul of Q and K ({op} on the scores)"
        path.append(node)
        value = node.inputs[idx]
    return "the scores path is too long"


def is_seq(dim, seq: str) -> bool:
    """The sequence dim, also as the exporter sometimes writes it below a position table
    of N rows: `Min(N, sequence)` (equal to the sequence for every length the model takes)."""
    if dim == seq:
        return True
    if not isinstance(dim, str):
        return False
    match = re.fullmatch(r"Min\((\w+),(\w+)\)", dim.replace(" ", ""))
    return match is not None and seq in match.groups() and any(g.isdigit() for g in match.groups())


def operand(matmul: ir.Node, index: int, seq: str) -> Operand | str:
    """Walk up from matmul.inputs[index] through layout ops; cut at the top [B, Hkv, S, Dh]
    tensor, or else at the top [B, S, Hkv, Dh] one."""
    chain: list[tuple[ir.Value, ir.Node, int]] = []
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
    for layout, seq_axis, head_axis in (("bhsd", 2, 1), ("bshd", 1, 2)):
        for pos in range(len(chain) - 1, -1, -1):
            value, consumer, idx = chain[pos]
            shape = dims(value)
            if shape and len(shape) == 4 and is_seq(shape[seq_axis], seq) and isinstance(shape[head_axis], int) \
                    and isinstance(shape[3], int):
                below = [c for _, c, _ in chain[: pos + 1]]
                return Operand(value, consumer, idx, below, layout)
    return f"no [batch, heads, {seq}, head_dim] tensor between the projection and the attention MatMul"


def _scaled_input(node: ir.Node) -> ir.Value | None:
    """For Mul/Div by a constant, the non-constant operand; else None."""
    if node.op_type not in SCALE_OPS or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if is_const(b) and not is_const(a):
        return a
    if node.op_type == "Mul" and is_const(a) and not is_const(b):
        return b
    return None


def _is_gate(softmax: ir.Node, content: set[ir.Value]) -> bool:
    """A Softmax over a linear layer's outputs (a mixture-of-experts router): it mixes no
    positions, so it is not an attention (a cache over it is still proven by the KV pass's
    checks). Walked through ops with one content input down to a MatMul/Gemm whose other
    input is constant."""
    value = softmax.inputs[0]
    for _ in range(16):
        node = value.producer()
        if node is None:
            return False
        data = [x for x in node.inputs if x is not None and x in content]
        if len(data) != 1:
            return False
        if node.op_type in ("MatMul", "Gemm"):
            return all(is_const(x) or x.producer() is not None and x.producer().op_type == "Transpose"
                       and is_const(x.producer().inputs[0]) for x in node.inputs if x is not None and x is not data[0])
        value = data[0]
    return False


def find_attentions(model: ir.Model) -> list[tuple[ir.Node, Attention | str]]:
    """Every Softmax of the graph with its attention, or the reason it is not one; router
    Softmaxes over a linear layer (`_is_gate`) are not attentions and are left out."""
    content = content_values(model.graph)
    found = []
    for softmax in [n for n in model.graph if n.op_type == "Softmax"]:
        if _is_gate(softmax, content):
            continue
        path = score_path(softmax, content)
        if isinstance(path, str):
            found.append((softmax, path))
            continue
        pv = probabilities_matmul(softmax)
        if pv is None:
            found.append((softmax, "no MatMul consumes the attention probabilities"))
            continue
        found.append((softmax, Attention(softmax, path[0], pv, path[1], path[2])))
    return found


# ---------------------------------------------------------------- mask forms

def neutral_scores(graph: ir.Graph, att: Attention, content: set[ir.Value]) -> tuple[ir.Value, list[ir.Node]]:
    """The scores path of `att` without its mask/bias terms, as new nodes before the Softmax."""
    value, nodes = att.scores, []
    terms = {n for n, _ in att.terms}
    for node in att.path:
        if node in terms:
            continue  # the term's node passes the scores through
        idx = next(i for i, x in enumerate(node.inputs) if x is not None and x in content)
        inputs = list(node.inputs)
        inputs[idx] = value
        clone = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                        num_outputs=len(node.outputs), name=f"kiln_scores_{node.name}")
        for new, old in zip(clone.outputs, node.outputs):
            new.dtype, new.shape = old.dtype, old.shape
        nodes.append(clone)
        value = clone.outputs[0]
    if nodes:
        graph.insert_before(att.softmax, nodes)
    return value, nodes


def classify_masks(model: ir.Model, atts: list[Attention], neutral: list[ir.Value], ids: ir.Value,
                   vocab: int, lengths: tuple[int, ...] = PROBE_LENGTHS,
                   window_probe: int = WINDOW_PROBE) -> list[MaskForm | str]:
    """The mask form of each attention (see the module docstring), or why it is not understood."""
    forms: list[MaskForm | str | None] = [None] * len(atts)
    outputs = [v for a, n in zip(atts, neutral) for v in (a.softmax.inputs[0], n)]
    rng = np.random.default_rng(5)
    for length in lengths:
        tokens = rng.integers(0, vocab, size=(2, length))
        arrays = _evaluate(model, {ids: tokens}, outputs)
        for i in range(len(atts)):
            if isinstance(forms[i], str):
                continue
            form = _form_of(np.asarray(arrays[2 * i], np.float64) - np.asarray(arrays[2 * i + 1], np.float64))
            if isinstance(form, str) or forms[i] is None:
                forms[i] = form
            elif form.window != forms[i].window or (form.slopes is None) != (forms[i].slopes is None) or (
                    form.slopes is not None and not np.allclose(form.slopes, forms[i].slopes, rtol=1e-4, atol=1e-7)):
                forms[i] = f"the mask differs between {lengths[0]} and {length} tokens"
    _long_windows(model, atts, forms, ids, window_probe)
    return forms  # type: ignore[return-value]


def _form_of(d: np.ndarray) -> MaskForm | str:
    """Classify D[b, h, s, t] = softmax input - scores path without its terms."""
    if d.ndim != 4 or d.shape[-1] != d.shape[-2]:
        return f"the attention scores are not [batch, heads, query, key] (shape {list(d.shape)})"
    with np.errstate(invalid="ignore"):
        allowed = d > MASKED_BELOW  # NaN: masked
    length = d.shape[-1]
    if not (allowed == allowed[:1, :1]).all():
        return "the mask depends on the batch row or the head"
    a = allowed[0, 0]
    s, t = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    causal = t <= s
    if (a & ~causal).any():
        return "the mask lets a query see later keys (not causal)"
    window = None
    if not (a == causal).all():
        window = int(a[-1].sum())
        if window < 1 or not (a == (causal & (t > s - window))).all():
            return "the mask is neither causal nor a causal sliding window"
    vals = np.where(allowed, d, np.nan)
    # Per-row constants do not change a softmax: only the slope along the key axis matters.
    rows = vals - np.nanmean(vals, axis=-1, keepdims=True)
    scale = max(float(np.nanmax(np.abs(vals))), 1e-30) if np.isfinite(vals).any() else 0.0
    if scale == 0.0 or float(np.nanmax(np.abs(rows))) <= 1e-6 * max(scale, 1.0):
        return MaskForm(window)
    tt = np.broadcast_to(np.arange(length, dtype=np.float64), vals.shape)
    tt = np.where(allowed, tt, np.nan)
    tc = tt - np.nanmean(tt, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.nansum(tc * rows, axis=-1) / np.nansum(tc * tc, axis=-1)  # [b, h, s]; NaN for 1-key rows
    per_head = np.nanmedian(slope.transpose(1, 0, 2).reshape(d.shape[1], -1), axis=1)
    fitted = per_head[None, :, None, None] * tc
    if not np.nanmax(np.abs(rows - fitted)) <= 1e-4 * max(scale, 1.0):
        return "the additive scores term is neither a mask nor ALiBi (slope per head times key position)"
    return MaskForm(window, per_head.astype(np.float32))


def _long_windows(model: ir.Model, atts: list[Attention], forms: list, ids: ir.Value, length: int) -> None:
    """Windows longer than the first probes: evaluate the mask terms alone on `length` tokens
    (terms are structural: zeros as ids) and read the last query row."""
    pending = [i for i, f in enumerate(forms) if isinstance(f, MaskForm)]
    if not pending or length <= 0:
        return
    content = content_values(model.graph)
    values, owners = [], []
    for i in pending:
        for node, idx in atts[i].terms:
            values.append(node.inputs[idx])
            owners.append((i, node))
    arrays = None
    while length > 2 * PROBE_LENGTHS[-1] and arrays is None:
        try:
            arrays = _evaluate(model, {ids: np.zeros((1, length), dtype=np.int64)}, values)
        except Exception:  # noqa: BLE001 - longer than the model's tables: a shorter probe
            length //= 2
    if arrays is None:
        return
    rows: dict[int, np.ndarray] = {}
    for (i, node), array in zip(owners, arrays):
        array = np.asarray(array)
        if array.ndim < 2 or array.shape[-1] != length or array.shape[-2] != length:
            continue  # not a [query, key] term (e.g. an ALiBi row)
        last = array.reshape(-1, length, length)[0, -1]
        if node.op_type == "Where":
            # The term is the condition: the scores pass where it holds if they are the X branch.
            row = last.astype(bool) if node.inputs[1] in content else ~last.astype(bool)
        else:
            with np.errstate(invalid="ignore"):
                row = last > MASKED_BELOW
        rows[i] = rows[i] & row if i in rows else row
    for i, row in rows.items():
        seen = int(row.sum())
        # Only a window the short probes could not see is taken from here: a long probe may
        # be past the model's own position tables (GPT-Neo's mask buffer), where its mask
        # means nothing. The pass's full check then runs past the window found.
        if forms[i].window is None and seen < length:
            forms[i] = MaskForm(seen, forms[i].slopes)

"""Structural analysis shared by the compression passes (low-rank, pruning, layer dropping).

Everything here is found from the graph's structure, never from value names:
- `linear_layers`: MatMuls with a constant 2-D weight W[K, N] (and the bias Add after them);
- `residual_stream`: the residual Adds `out = skip + f(skip)` in graph order, grouped into
  decoder layers (an attention sublayer and the sublayers that follow it up to the next one);
- `find_mlps`: a down projection whose input is computed channel-wise (elementwise ops only)
  from one or more up projections (gate/up for a gated MLP, fc1 + bias for GELU MLPs);
- `find_attentions`: per attention (found by the shared `kiln.passes.attention`), the Q, K, V and O
  projections, the query/kv head counts and the head dim;
- `refresh_shapes`: after a pass changed an int dim (heads, channels), the annotated shapes
  are re-read from one short ORT run (symbolic dims stay symbolic).

Parameters are counted as `kiln.ir.summary` counts them: the elements of every initializer
(a tied embedding read through a Transpose counts once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from kiln.passes.numerics import ort_session

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Sigmoid", "Tanh", "Relu", "Erf", "Gelu", "FastGelu", "Pow", "Neg",
               "Exp", "Sqrt", "Identity", "Cast", "Clip", "Max", "Min", "LeakyRelu", "HardSigmoid", "Softplus",
               "HardSwish", "Abs", "Reciprocal"}


def param_count(model: ir.Model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)


def const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    p = value.producer()
    if p is not None and p.op_type == "Constant" and "value" in p.attributes:
        return p.attributes["value"].value.numpy()
    return None


def is_const(value: ir.Value | None) -> bool:
    return value is not None and (value.const_value is not None
                                  or (value.producer() is not None and value.producer().op_type == "Constant"))


def weight_of(node: ir.Node) -> np.ndarray | None:
    """W[K, N] of a MatMul whose second input is a constant 2-D initializer (not through a Transpose)."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    w = node.inputs[1]
    if w is None or w.const_value is None or len(w.const_value.shape) != 2 or node.inputs[0] is None:
        return None
    if is_const(node.inputs[0]):
        return None
    return w.const_value.numpy()


def bias_of(node: ir.Node) -> tuple[ir.Node, int] | None:
    """The Add(MatMul output, const bias[N]) right after a linear layer: (add node, bias input index)."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    other = 1 - uses[0].idx
    b = add.inputs[other]
    w = weight_of(node)
    if b is None or b.const_value is None or w is None or tuple(b.const_value.shape) != (w.shape[1],):
        return None
    return add, other


def linear_output(node: ir.Node) -> ir.Value:
    """The linear layer's output after its bias (if any)."""
    bias = bias_of(node)
    return bias[0].outputs[0] if bias else node.outputs[0]


def linear_layers(model: ir.Model, include_outputs: bool = False) -> list[ir.Node]:
    return [n for n in model.graph if weight_of(n) is not None
            and (include_outputs or not any(o.is_graph_output() for o in n.outputs))]


def unique_name(graph: ir.Graph, name: str) -> str:
    candidate, i = name, 0
    while candidate in graph.initializers:
        i += 1
        candidate = f"{name}.{i}"
    return candidate


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """A new initializer named `name` (or `name.1`, ... when taken)."""
    value = ir.val(unique_name(graph, name), const_value=ir.tensor(np.asarray(array, order="C"), dtype=dtype))
    graph.register_initializer(value)
    return value


def set_const_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, suffix: str) -> ir.Value:
    """Give `node` a new initializer as input `index` (the old one is left for dead-code removal)."""
    old = node.inputs[index]
    base = (old.name if old is not None and old.name else node.name or "w") + suffix
    value = new_initializer(graph, base, array)
    node.replace_input_with(index, value)
    return value


def remove_unused_initializers(model: ir.Model) -> None:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)


# ---------------------------------------------------------------- reachability

def ancestors(values: Iterable[ir.Value], stop: set[ir.Value] | None = None) -> set[ir.Node]:
    stop = stop or set()
    seen: set[ir.Node] = set()
    stack = [v for v in values if v not in stop]
    while stack:
        p = stack.pop().producer()
        if p is None or p in seen:
            continue
        seen.add(p)
        stack.extend(i for i in p.inputs if i is not None and i not in stop)
    return seen


def descendants(values: Iterable[ir.Value]) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = list(values)
    while stack:
        for use in stack.pop().uses():
            if use.node not in seen:
                seen.add(use.node)
                stack.extend(use.node.outputs)
    return seen


def depends_on(value: ir.Value, source: ir.Value, limit: int = 4000) -> bool:
    stack, seen = [value], set()
    while stack and len(seen) < limit:
        v = stack.pop()
        if v is source:
            return True
        p = v.producer()
        if p is None or p in seen:
            continue
        seen.add(p)
        stack.extend(i for i in p.inputs if i is not None and not is_const(i))
    return False


# ---------------------------------------------------------------- residual stream

@dataclasses.dataclass
class Sublayer:
    add: ir.Node
    skip: ir.Value  # the stream value entering
    out: ir.Value  # skip + f(skip)
    nodes: set[ir.Node]  # nodes of f (between skip and out)
    attention: bool


@dataclasses.dataclass
class Layer:
    sublayers: list[Sublayer]
    start: ir.Value  # stream value entering the layer
    end: ir.Value | None  # stream value leaving it (None: not known, e.g. last layer of a post-norm model)

    @property
    def nodes(self) -> set[ir.Node]:
        return set().union(*(s.nodes for s in self.sublayers)) | {s.add for s in self.sublayers}


def residual_stream(model: ir.Model) -> list[Sublayer]:
    """The residual Adds `skip + f(skip)` chained in graph order (each skip depends on the previous out)."""
    found: list[Sublayer] = []
    for node in model.graph:
        if node.op_type != "Add" or len(node.inputs) != 2 or any(is_const(i) or i is None for i in node.inputs):
            continue
        a, b = node.inputs
        for skip, branch in ((a, b), (b, a)):
            if len(list(skip.uses())) < 2 or branch.producer() is None:
                continue
            if depends_on(branch, skip):
                nodes = ancestors([branch], stop={skip}) & descendants([skip])
                found.append(Sublayer(node, skip, node.outputs[0], nodes,
                                      any(n.op_type == "Softmax" for n in nodes)))
                break
    # keep the longest chain: each skip must depend on the previous sublayer's output
    chain: list[Sublayer] = []
    for s in found:
        if not chain or s.skip is chain[-1].out or depends_on(s.skip, chain[-1].out, limit=64):
            chain.append(s)
    return chain


def decoder_layers(model: ir.Model) -> list[Layer]:
    """Residual sublayers grouped into layers, each starting at an attention sublayer."""
    stream = residual_stream(model)
    layers: list[list[Sublayer]] = []
    for s in stream:
        if s.attention or not layers:
            layers.append([s])
        else:
            layers[-1].append(s)
    out: list[Layer] = []
    for i, subs in enumerate(layers):
        end = layers[i + 1][0].skip if i + 1 < len(layers) else None
        if end is None and all(stream[k + 1].skip is stream[k].out for k in range(len(stream) - 1)):
            end = subs[-1].out  # pre-norm: the stream is the chain of Adds itself
        out.append(Layer(subs, subs[0].skip, end))
    return out


def exclusive_params(model: ir.Model, nodes: set[ir.Node]) -> int:
    """Elements of initializers read only by `nodes`."""
    total = 0
    for v in model.graph.initializers.values():
        uses = list(v.uses())
        if uses and v.const_value is not None and all(u.node in nodes for u in uses):
            total += v.const_value.size
    return total


# ---------------------------------------------------------------- MLPs

@dataclasses.dataclass
class MLP:
    ups: list[ir.Node]  # MatMuls W[D, I] feeding the channel-wise region
    down: ir.Node  # MatMul W[I, D']
    region: list[ir.Node]  # elementwise nodes between (graph order)
    channel_consts: list[tuple[ir.Node, int]]  # constant [I] inputs inside the region (incl. up biases)
    inter: ir.Value  # the down projection's input [.., I]
    width: int


def _mlp_of(down: ir.Node, order: dict) -> MLP | str:
    w = weight_of(down)
    width = w.shape[0]
    inter = down.inputs[0]
    ups: list[ir.Node] = []
    region: set[ir.Node] = set()
    consts: list[tuple[ir.Node, int]] = []
    stack = [inter]
    seen: set[ir.Value] = set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        p = v.producer()
        if p is None:
            return "reads a graph input"
        uw = weight_of(p)
        if uw is not None:
            if uw.shape[1] != width:
                return f"projection width {uw.shape[1]} != {width}"
            ups.append(p)
            continue
        if p.op_type not in ELEMENTWISE:
            return f"{p.op_type} between the projections"
        region.add(p)
        for i, x in enumerate(p.inputs):
            if x is None:
                continue
            c = const_array(x)
            if c is not None:
                if c.size == 1:
                    continue
                if c.shape[-1:] == (width,) and c.size == width:
                    consts.append((p, i))
                    continue
                return f"constant of shape {c.shape} in the channel-wise region"
            dims = x.shape
            if dims is None or not dims or dims[-1] != width:
                return "a value in the region is not [.., width]"
            stack.append(x)
    if not ups:
        return "no up projection"
    inside = region | {down}
    for n in region | set(ups):
        for o in n.outputs:
            if o.is_graph_output() or any(u.node not in inside for u in o.uses()):
                return "an intermediate value is read outside the MLP"
    return MLP(sorted(ups, key=order.__getitem__), down, sorted(region, key=order.__getitem__), consts, inter, width)


def find_mlps(model: ir.Model) -> tuple[list[MLP], list[str]]:
    order = {n: i for i, n in enumerate(model.graph)}
    mlps, rejected = [], []
    for node in linear_layers(model):
        p = node.inputs[0].producer()
        if p is None or p.op_type not in ELEMENTWISE:
            continue
        found = _mlp_of(node, order)
        if isinstance(found, MLP):
            mlps.append(found)
    return mlps, rejected


# ---------------------------------------------------------------- attention

LAYOUT = {"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Cast", "Identity"}


@dataclasses.dataclass
class Attention:
    softmax: ir.Node
    q: ir.Node
    k: ir.Node
    v: ir.Node
    o: ir.Node
    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    region: list[ir.Node]  # nodes from the projections' outputs to the O projection (graph order)

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads


def _projection_above(value: ir.Value, limit: int = 256) -> set[ir.Node] | str:
    found: set[ir.Node] = set()
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        p = v.producer()
        if p is None or p in seen or is_const(v):
            continue
        seen.add(p)
        if len(seen) > limit:
            return "too far from a projection"
        if weight_of(p) is not None:
            found.add(p)
            continue
        if p.op_type in ("Softmax", "MatMul", "Gather", "ReduceMean", "LayerNormalization"):
            continue
        stack.extend(i for i in p.inputs if i is not None)
    return found


def _projection_below(value: ir.Value, limit: int = 8) -> ir.Node | None:
    for _ in range(limit):
        uses = list(value.uses())
        if len(uses) != 1:
            return None
        node = uses[0].node
        if weight_of(node) is not None and uses[0].idx == 0:
            return node
        if node.op_type not in LAYOUT:
            return None
        value = node.outputs[0]
    return None


def find_attentions(model: ir.Model) -> tuple[list[Attention], list[str]]:
    """Per attention found by the shared analysis (`kiln.passes.attention`), its projections."""
    from kiln.passes.attention import Attention as Found
    from kiln.passes.attention import find_attentions as find_softmax_attentions

    order = {n: i for i, n in enumerate(model.graph)}
    found, rejected = [], []
    for sm, att in find_softmax_attentions(model):
        if not isinstance(att, Found):
            rejected.append(f"{sm.name}: not a Softmax(Q·Kᵀ)·V attention ({att})")
            continue
        qk, pv = att.qk, att.pv
        projs = [_projection_above(qk.inputs[0]), _projection_above(qk.inputs[1]), _projection_above(pv.inputs[1])]
        if any(isinstance(s, str) or len(s) != 1 for s in projs):
            rejected.append(f"{sm.name}: Q, K and V are not each one projection")
            continue
        q, k, v = (next(iter(s)) for s in projs)
        if len({q, k, v}) != 3:
            rejected.append(f"{sm.name}: Q, K, V come from one packed projection (not handled)")
            continue
        o = _projection_below(pv.outputs[0])
        if o is None:
            rejected.append(f"{sm.name}: no output projection after the attention")
            continue
        qo, ko, vo = (linear_output(n) for n in (q, k, v))
        heads = _dims(qk.inputs[0])
        vh = _dims(pv.outputs[0])
        wq, wk, wv, wo = (weight_of(n) for n in (q, k, v, o))
        if not heads or len(heads) != 4 or not isinstance(heads[1], int) or not isinstance(heads[3], int):
            rejected.append(f"{sm.name}: Q is not annotated [B, H, S, Dh]")
            continue
        h, dh = heads[1], heads[3]
        dv = vh[3] if vh and isinstance(vh[3], int) else None
        if wq.shape[1] != h * dh or dv is None or wv.shape[1] % dv or wk.shape[1] % dh or wo.shape[0] != h * dv:
            rejected.append(f"{sm.name}: projection widths do not match {h} heads of {dh}")
            continue
        hkv = wk.shape[1] // dh
        if wv.shape[1] // dv != hkv or h % hkv:
            rejected.append(f"{sm.name}: {h} query heads do not group over the kv heads")
            continue
        region = (descendants([qo, ko, vo]) & ancestors([o.inputs[0]])) | {n for n in (bias_of(q), bias_of(k), bias_of(v)) if n for n in [n[0]]}
        found.append(Attention(sm, q, k, v, o, h, hkv, dh, dv, sorted(region, key=order.__getitem__)))
    return found, rejected


def _dims(value: ir.Value) -> list | None:
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None) for d in value.shape]


# ---------------------------------------------------------------- shapes

def short_feed(calibration: Sequence[dict[str, np.ndarray]] | None, model: ir.Model, tokens: int = 8) -> dict:
    """A small feed for shape probing: the first `tokens` of the first calibration feed (or ones)."""
    if calibration:
        return {k: (v[:, :tokens] if v.ndim == 2 else v) for k, v in calibration[0].items()}
    feed = {}
    for v in model.graph.inputs:
        shape = [d if isinstance(d, int) else (1 if i == 0 else tokens) for i, d in enumerate(v.shape)]
        feed[v.name] = np.ones(shape, dtype=v.dtype.numpy())
    return feed


def refresh_shapes(model: ir.Model, feed: dict[str, np.ndarray], values: Iterable[ir.Value] | None = None) -> int:
    """Re-annotate int dims of intermediate values from one ORT run on `feed`; symbolic dims stay.

    Returns the number of values whose annotation changed. Values of unknown rank stay as they are.
    """
    graph = model.graph
    targets = list(values) if values is not None else [o for n in graph for o in n.outputs]
    targets = [v for v in targets if v.shape is not None and v.dtype is not None and not v.is_graph_output()
               and any(isinstance(d, int) for d in v.shape) and v.producer() is not None
               and v.producer().op_type != "Constant" and not all(is_const(i) for i in v.producer().inputs if i is not None)]
    if not targets:
        return 0
    saved = {v: v.shape for v in targets}
    for v in targets:
        v.shape = None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    outputs = list(graph.outputs)
    graph.outputs.extend(targets)
    try:
        session = ort_session(model, opts)
    finally:
        graph.outputs.clear()
        graph.outputs.extend(outputs)
        for v, s in saved.items():
            v.shape = s
    names = [v.name for v in targets]
    inputs = {i.name for i in session.get_inputs()}
    arrays = session.run(names, {k: v for k, v in feed.items() if k in inputs})
    changed = 0
    for v, a in zip(targets, arrays):
        old = list(v.shape)
        if len(old) != a.ndim:
            continue
        new = [a.shape[i] if isinstance(d, int) else d for i, d in enumerate(old)]
        if new != old:
            v.shape = ir.Shape(new)
            changed += 1
    return changed


# ---------------------------------------------------------------- targets

def check_target(target_params: float, target_mb: float) -> None:
    if not 0 <= target_params <= 1:
        raise ValueError(f"target_params must be in (0, 1] (the fraction of parameters to keep), got {target_params}")
    if target_mb < 0:
        raise ValueError(f"target_mb must be > 0, got {target_mb}")
    if target_params and target_mb:
        raise ValueError("give target_params or target_mb, not both")


def params_to_keep(model: ir.Model, target_params: float, target_mb: float) -> int | None:
    """The parameter count a target asks for: `target_params` × the model's parameters (embeddings
    included, a tied table counted once), or `target_mb` of weights at the model's current mean
    bytes per parameter (for an fp32 model: 4)."""
    total = param_count(model)
    if target_params:
        return round(target_params * total)
    if target_mb:
        nbytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        return int(target_mb * 1e6 / (nbytes / max(total, 1)))
    return None


def check_metric(metric: str) -> None:
    known = ("kl", "cosine", "max_rel", "max_abs", "top1")
    if metric not in known:
        raise ValueError(f"metric must be one of {', '.join(known)}, got '{metric}'")


@dataclasses.dataclass
class Gram:
    """Σ xᵀx over the rows of a captured value (last axis = channels), and the row count."""

    gram: np.ndarray
    rows: int
    total: np.ndarray | None = None  # Σ x

    @property
    def sq_sum(self) -> np.ndarray:
        return np.diag(self.gram).copy()

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.rows, 1)

    @property
    def covariance(self) -> np.ndarray:
        mu = self.mean
        return self.gram / max(self.rows, 1) - np.outer(mu, mu)


def grams(model: ir.Model, feeds, names: Sequence[str]) -> dict[str, Gram]:
    """Gram matrices of the named values over the calibration feeds: float32 products per
    feed (fast BLAS), accumulated in float64."""
    from kiln.passes.calibration import capture

    out: dict[str, Gram] = {}
    for arrays in capture(model, feeds, list(dict.fromkeys(names))):
        for name, x in arrays.items():
            x = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
            g = (x.T @ x).astype(np.float64)
            t = x.sum(0, dtype=np.float64)
            if name in out:
                out[name].gram += g
                out[name].rows += x.shape[0]
                out[name].total += t
            else:
                out[name] = Gram(g, x.shape[0], t)
    return out


AMOUNT_KNOBS = ("target_params", "target_mb", "ratio", "energy", "rank", "layers", "drop")


def retarget_steps(steps: list[tuple[str, dict]], target_params: float | None = None,
                   target_mb: float | None = None) -> list[tuple[str, dict]]:
    """A recipe's steps with a whole-model target (`kiln compile --target-params/--target-size`)
    given to its structural pass, replacing that pass's own amount (ratio, energy, rank, ...).

    The recipe must hold exactly one pass that takes `target_params` (each pass's target is
    relative to the model it sees, so two would compound)."""
    from kiln.passes.registry import get_pass

    from kiln.errors import KilnError

    if target_params is None and target_mb is None:
        return steps
    check_target(target_params or 0.0, target_mb or 0.0)
    takes = [i for i, (name, _) in enumerate(steps) if "target_params" in get_pass(name).parameter_names()]
    if len(takes) != 1:
        which = ", ".join(steps[i][0] for i in takes) or "none"
        raise KilnError(f"--target-params/--target-size need a recipe with exactly one structural pass "
                        f"(this one has: {which}); set targets per pass in the recipe instead")
    out = [(name, dict(params)) for name, params in steps]
    _name, params = out[takes[0]]
    for knob in AMOUNT_KNOBS:
        params.pop(knob, None)
    params["target_params" if target_params is not None else "target_mb"] = (
        target_params if target_params is not None else target_mb)
    return out


def parse_size_mb(text: str) -> float:
    """'60MB' / '60 MB' / '0.5GB' / '60' (MB) -> megabytes."""
    t = text.strip().upper().replace(" ", "")
    for suffix, scale in (("GB", 1000.0), ("MB", 1.0), ("KB", 1e-3), ("G", 1000.0), ("M", 1.0)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * scale
    return float(t)

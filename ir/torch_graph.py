"""A differentiable evaluation of an ONNX graph in torch, for passes that tune parameters by gradient.

ONNX Runtime has no backward pass in its inference build, so a pass that trains something
(e.g. quantization scales against the float model's outputs) runs the graph here instead:
each node becomes the torch call with the same semantics, in graph order, and any
initializer can be swapped for a `torch.nn.Parameter`. Covered: the standard ops that the
exporter and kiln's passes produce for transformer decoders and encoders, plus the ONNX
Runtime contrib ops kiln's fusions write (GroupQueryAttention, MultiHeadAttention,
(Skip)SimplifiedLayerNormalization, SkipLayerNormalization, Gelu variants) and blocked
DequantizeLinear. Anything else raises `UnsupportedOp` naming the op, before any work.

Not handled: control flow (If/Loop/Scan), sequence types, attention with a padded or
preallocated past (the cache must hold exactly the `total_sequence_length - S` earlier
tokens), GroupQueryAttention's local window.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F


class UnsupportedOp(ValueError):
    pass


_DTYPES = {
    ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.DOUBLE: torch.float64, ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32,
    ir.DataType.INT16: torch.int16, ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool, ir.DataType.INT4: torch.int8, ir.DataType.UINT4: torch.uint8,
}


def to_torch(tensor) -> torch.Tensor:
    array = np.asarray(tensor.numpy())
    if tensor.dtype in (ir.DataType.INT4, ir.DataType.UINT4):  # ml_dtypes 4-bit: widen to 8
        array = array.astype(np.int8 if tensor.dtype == ir.DataType.INT4 else np.uint8)
    if not array.flags.writeable or not array.flags.c_contiguous:
        # torch wants writable memory (weights may be mapped read-only from disk); a copy, not
        # np.ascontiguousarray, which turns a 0-d array into a 1-d one
        array = array.copy(order="C")
    return torch.from_numpy(array)


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _ints(x: torch.Tensor | None) -> list[int] | None:
    return None if x is None else [int(v) for v in x.reshape(-1).tolist()]


def _axes(node, inputs, index=1):
    """Axes from the input (opset >= 13/18) or the attribute (older)."""
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])
    return _attr(node, "axes")


def _reduce(fn):
    def op(node, x, *rest):
        axes = _axes(node, (x, *rest))
        keep = bool(_attr(node, "keepdims", 1))
        if not axes:
            if _attr(node, "noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=axes, keepdim=keep)
    return op


def _reshape(node, x, shape):
    shape = _ints(shape)
    if not _attr(node, "allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _split(node, x, split=None):
    axis = _attr(node, "axis", 0)
    sizes = _ints(split) or _attr(node, "split")
    if sizes is None:
        n = _attr(node, "num_outputs", len(node.outputs))
        size = -(-x.shape[axis] // n)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(n)]
    return list(torch.split(x, sizes, dim=axis))


def _slice(node, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) or list(range(len(starts)))
    steps = _ints(steps) or [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st != 1:
            raise UnsupportedOp("Slice with steps other than 1")
        n = x.shape[a]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        index[a] = slice(s, e)
    return x[tuple(index)]


def _gather(node, x, idx):
    axis = _attr(node, "axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


def _div(node, a, b):
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _cast(node, x):
    return x.to(_DTYPES[ir.DataType(_attr(node, "to"))])


def _shape(node, x):
    n = x.dim()
    start, end = _attr(node, "start", 0), _attr(node, "end", n)
    start, end = start + n if start < 0 else start, end + n if end < 0 else end
    return torch.tensor(list(x.shape)[max(0, start):min(n, end)], dtype=torch.int64)


def _rms(x, gamma, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * gamma


def _simplified_ln(node, x, gamma):
    if _attr(node, "axis", -1) not in (-1, x.dim() - 1):
        raise UnsupportedOp("SimplifiedLayerNormalization over other than the last axis")
    return _rms(x, gamma, _attr(node, "epsilon", 1e-5))


def _layer_norm(node, x, gamma, beta=None):
    axis = _attr(node, "axis", -1) % x.dim()
    return F.layer_norm(x, x.shape[axis:], gamma, beta, _attr(node, "epsilon", 1e-5))


def _skip_simplified_ln(node, x, skip, gamma, bias=None):
    s = x + skip + (bias if bias is not None else 0)
    return [_rms(s, gamma, _attr(node, "epsilon", 1e-5)), None, None, s]


def _skip_ln(node, x, skip, gamma, beta=None, bias=None):
    s = x + skip + (bias if bias is not None else 0)
    return [F.layer_norm(s, s.shape[-1:], gamma, beta, _attr(node, "epsilon", 1e-5)), None, None, s]


def _dequantize(node, x, scale, zero=None):
    x = x.float()
    if scale.dim() == 0:
        return (x - (zero.float() if zero is not None else 0)) * scale
    axis = _attr(node, "axis", 1) % x.dim()
    block = _attr(node, "block_size", 0)

    def expand(t):
        if block:
            return t.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
        shape = [1] * x.dim()
        shape[axis] = -1
        return t.reshape(shape)

    if zero is not None:
        x = x - expand(zero.float())
    return x * expand(scale)


def _rotate(x, cos, sin, interleaved):
    """x [B, N, S, D]; cos/sin [B, S, D/2]."""
    cos, sin = cos[:, None], sin[:, None]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _attend(q, k, v, scale, bias, causal_offset, softcap=0.0):
    """q [B, H, S, D], k/v [B, Hkv, T, D] (Hkv divides H); returns [B, S, H·D]."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if causal_offset is not None:  # query i sees keys j <= offset + i
        s, t = scores.shape[-2:]
        allowed = torch.arange(t)[None, :] <= causal_offset + torch.arange(s)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    if bias is not None:
        scores = scores + bias
    out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
    return out.transpose(1, 2).flatten(2)


def _gqa(node, query, key=None, value=None, past_key=None, past_value=None, seqlens=None, total=None,
         cos=None, sin=None, positions=None, bias=None, *rest):
    if _attr(node, "local_window_size", -1) != -1:
        raise UnsupportedOp("GroupQueryAttention with a local window")
    heads, kv_heads = _attr(node, "num_heads"), _attr(node, "kv_num_heads")
    b, s = query.shape[:2]
    if key is None:  # packed QKV
        d = query.shape[-1] // (heads + 2 * kv_heads)
        query, key, value = query.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    d = query.shape[-1] // heads
    q = query.reshape(b, s, heads, d).transpose(1, 2)
    k = key.reshape(b, s, kv_heads, d).transpose(1, 2)
    v = value.reshape(b, s, kv_heads, d).transpose(1, 2)
    past = 0 if past_key is None else past_key.shape[2]
    if total is not None and int(total.reshape(-1)[0]) != past + s:
        raise UnsupportedOp("GroupQueryAttention over a padded or preallocated past")
    if _attr(node, "do_rotary", 0):
        pos = positions.long() if positions is not None else (past + torch.arange(s))[None].expand(b, s)
        interleaved = bool(_attr(node, "rotary_interleaved", 0))
        q, k = (_rotate(t, cos[pos], sin[pos], interleaved) for t in (q, k))
    if past:
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    scale = _attr(node, "scale", 0.0) or 1.0 / math.sqrt(d)
    out = _attend(q, k, v, scale, bias, past, _attr(node, "softcap", 0.0))
    return [out, k, v]


def _mha(node, query, key, value, bias=None, key_padding_mask=None, attention_bias=None,
         past_key=None, past_value=None, *rest):
    heads = _attr(node, "num_heads")
    if key is None or key.dim() != 3 or past_key is not None:
        raise UnsupportedOp("MultiHeadAttention with packed inputs or a past")
    if bias is not None:
        dq, dk = query.shape[-1], key.shape[-1]
        query, key, value = query + bias[:dq], key + bias[dq:dq + dk], value + bias[dq + dk:]
    b, s, _ = query.shape
    d = query.shape[-1] // heads
    q = query.reshape(b, s, heads, d).transpose(1, 2)
    k = key.reshape(b, key.shape[1], heads, d).transpose(1, 2)
    v = value.reshape(b, value.shape[1], heads, -1).transpose(1, 2)
    mask = attention_bias
    if key_padding_mask is not None:
        if key_padding_mask.dim() != 2:
            raise UnsupportedOp("MultiHeadAttention with a key padding mask other than [B, L]")
        pad = (key_padding_mask == 0)[:, None, None, :].float() * _attr(node, "mask_filter_value", -10000.0)
        mask = pad if mask is None else mask + pad
    scale = _attr(node, "scale", 0.0) or 1.0 / math.sqrt(d)
    causal = 0 if _attr(node, "unidirectional", 0) else None
    return _attend(q, k, v, scale, mask, causal)


def _gelu(approximate):
    return lambda node, x, bias=None: F.gelu(x + (bias if bias is not None else 0),
                                             approximate=_attr(node, "approximate", approximate))


def _binary(fn):
    return lambda node, a, b: fn(a, b)


def _unary(fn):
    return lambda node, x: fn(x)


def _fold(fn, xs):
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out


def _unsqueezed(shape, axes):
    n = len(shape) + len(axes)
    axes = sorted(a % n for a in axes)
    out = list(shape)
    for a in axes:
        out.insert(a, 1)
    return out


def _constant(node: ir.Node) -> torch.Tensor:
    for name, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                        ("value_int", torch.int64), ("value_ints", torch.int64)):
        if name in node.attributes:
            return torch.tensor(_attr(node, name), dtype=dtype)
    if "value" not in node.attributes:
        raise UnsupportedOp(f"Constant with {', '.join(node.attributes)}")
    return to_torch(_attr(node, "value"))


def _gather_nd(node, x, idx):
    batch = _attr(node, "batch_dims", 0)
    if batch > 1:
        raise UnsupportedOp("GatherND with batch_dims > 1")
    idx = idx.long()
    if batch == 0:
        return x[tuple(idx[..., i] for i in range(idx.shape[-1]))]
    rows = torch.arange(x.shape[0]).reshape(-1, *[1] * (idx.dim() - 2))
    return x[(rows, *(idx[..., i] for i in range(idx.shape[-1])))]


def _scatter_elements(node, x, idx, updates):
    if _attr(node, "reduction", "none") != "none":
        raise UnsupportedOp("ScatterElements with a reduction")
    axis = _attr(node, "axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    return x.scatter(axis, idx, updates)


def _scatter_nd(node, x, idx, updates):
    if _attr(node, "reduction", "none") != "none":
        raise UnsupportedOp("ScatterND with a reduction")
    out = x.clone()
    idx = idx.long()
    out[tuple(idx[..., i] for i in range(idx.shape[-1]))] = updates
    return out


OPS: dict[tuple[str, str], Callable] = {
    ("", "Identity"): _unary(lambda x: x),
    ("", "Cast"): _cast,
    ("", "CastLike"): lambda node, x, like: x.to(like.dtype),
    ("", "Shape"): _shape,
    ("", "Size"): lambda node, x: torch.tensor(x.numel(), dtype=torch.int64),
    ("", "Reshape"): _reshape,
    ("", "Flatten"): lambda node, x: x.reshape(int(np.prod(x.shape[:_attr(node, "axis", 1)])), -1),
    ("", "Transpose"): lambda node, x: x.permute(_attr(node, "perm", list(range(x.dim()))[::-1])),
    ("", "Unsqueeze"): lambda node, x, axes=None: x.reshape(_unsqueezed(x.shape, _axes(node, (x, axes)))),
    ("", "Squeeze"): lambda node, x, axes=None: (x.squeeze() if not _axes(node, (x, axes))
                                                  else x.squeeze(tuple(a % x.dim() for a in _axes(node, (x, axes))))),
    ("", "Concat"): lambda node, *xs: torch.cat([x for x in xs if x is not None], dim=_attr(node, "axis")),
    ("", "Split"): _split,
    ("", "Slice"): _slice,
    ("", "Gather"): _gather,
    ("", "Expand"): lambda node, x, shape: x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape)))),
    ("", "Tile"): lambda node, x, reps: x.repeat(_ints(reps)),
    ("", "Range"): lambda node, a, b, d: torch.arange(a.item(), b.item(), d.item(), dtype=a.dtype),
    ("", "ConstantOfShape"): lambda node, shape: torch.full(
        _ints(shape), to_torch(_attr(node, "value")).item() if _attr(node, "value") is not None else 0.0,
        dtype=to_torch(_attr(node, "value")).dtype if _attr(node, "value") is not None else torch.float32),
    ("", "Where"): lambda node, c, a, b: torch.where(c, a, b),
    ("", "Equal"): _binary(torch.eq), ("", "Less"): _binary(torch.lt), ("", "LessOrEqual"): _binary(torch.le),
    ("", "Greater"): _binary(torch.gt), ("", "GreaterOrEqual"): _binary(torch.ge),
    ("", "And"): _binary(torch.logical_and), ("", "Or"): _binary(torch.logical_or),
    ("", "Not"): _unary(torch.logical_not), ("", "IsNaN"): _unary(torch.isnan), ("", "IsInf"): _unary(torch.isinf),
    ("", "Add"): _binary(torch.add), ("", "Sub"): _binary(torch.sub), ("", "Mul"): _binary(torch.mul),
    ("", "Div"): _div, ("", "Pow"): _binary(torch.pow), ("", "Mod"): lambda node, a, b: torch.remainder(a, b),
    ("", "Max"): lambda node, *xs: _fold(torch.maximum, xs), ("", "Min"): lambda node, *xs: _fold(torch.minimum, xs),
    ("", "Neg"): _unary(torch.neg), ("", "Abs"): _unary(torch.abs), ("", "Sqrt"): _unary(torch.sqrt),
    ("", "Reciprocal"): _unary(torch.reciprocal), ("", "Exp"): _unary(torch.exp), ("", "Log"): _unary(torch.log),
    ("", "Tanh"): _unary(torch.tanh), ("", "Erf"): _unary(torch.erf), ("", "Sigmoid"): _unary(torch.sigmoid),
    ("", "Relu"): _unary(torch.relu), ("", "Sin"): _unary(torch.sin), ("", "Cos"): _unary(torch.cos),
    ("", "Floor"): _unary(torch.floor), ("", "Ceil"): _unary(torch.ceil),
    ("", "Softplus"): _unary(F.softplus),
    ("", "Clip"): lambda node, x, lo=None, hi=None: torch.clamp(x, None if lo is None else lo.item(),
                                                                  None if hi is None else hi.item()),
    ("", "MatMul"): lambda node, a, b: a @ b,
    ("", "Gemm"): lambda node, a, b, c=None: _attr(node, "alpha", 1.0) * (
        (a.T if _attr(node, "transA", 0) else a) @ (b.T if _attr(node, "transB", 0) else b))
    + (_attr(node, "beta", 1.0) * c if c is not None else 0),
    ("", "Softmax"): lambda node, x: torch.softmax(x, dim=_attr(node, "axis", -1)),
    ("", "ReduceMean"): _reduce(torch.mean), ("", "ReduceSum"): _reduce(torch.sum),
    ("", "ReduceMax"): _reduce(torch.amax),
    ("", "ReduceL2"): _reduce(lambda x, dim, keepdim: torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim)),
    ("", "GatherND"): _gather_nd,
    ("", "ScatterElements"): _scatter_elements, ("", "ScatterND"): _scatter_nd, ("", "ReduceMin"): _reduce(torch.amin),
    ("", "CumSum"): lambda node, x, axis: torch.cumsum(x, dim=int(axis)),
    ("", "Trilu"): lambda node, x, k=None: (torch.triu if _attr(node, "upper", 1) else torch.tril)(
        x, 0 if k is None else int(k)),
    ("", "Gelu"): _gelu("none"),
    ("", "LayerNormalization"): _layer_norm,
    ("", "SimplifiedLayerNormalization"): _simplified_ln,
    ("", "DequantizeLinear"): _dequantize,
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): _skip_simplified_ln,
    ("com.microsoft", "SkipLayerNormalization"): _skip_ln,
    ("com.microsoft", "Gelu"): _gelu("none"), ("com.microsoft", "BiasGelu"): _gelu("none"),
    ("com.microsoft", "FastGelu"): _gelu("tanh"),
    ("com.microsoft", "QuickGelu"): lambda node, x: x * torch.sigmoid(_attr(node, "alpha", 1.702) * x),
    ("com.microsoft", "GroupQueryAttention"): _gqa,
    ("com.microsoft", "MultiHeadAttention"): _mha,
}


def _domain(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


class _DequantizeKeepingInputs(torch.autograd.Function):
    """DequantizeLinear whose backward recomputes its intermediates (the widened integers, the
    expanded scales: two float32 copies of the weight) instead of keeping them from the forward;
    the gradient is computed by the same ops, so it is the same."""

    @staticmethod
    def forward(ctx, node, x, scale, zero):
        ctx.node = node
        ctx.save_for_backward(x, scale, zero)
        return _dequantize(node, x, scale, zero)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero = ctx.saved_tensors
        with torch.enable_grad():
            s = scale.detach().requires_grad_()
            (grad_scale,) = torch.autograd.grad(_dequantize(ctx.node, x, s, zero), s, grad)
        return None, None, grad_scale, None


# Weight-side results smaller than this are kept for the backward pass as usual.
RECOMPUTE_ELEMENTS = 1 << 16


class TorchGraph:
    """Run `model.graph` in torch. `parameters` replace initializers (or any value) by name.

    When a gradient is wanted (grad mode on, a parameter that requires it), the large tensors
    computed from weights alone (dequantized weights and their transposes) are not kept for the
    backward pass: autograd's saved-tensor hooks recompute them there, from the initializers and
    the parameters, by the same ops. Training a 0.5B model's quantization scales would otherwise
    keep two or three float32 copies of every weight from each forward to its backward."""

    recompute = True  # False: autograd keeps everything (the same gradients, more memory)

    def __init__(self, model: ir.Model):
        self.graph = model.graph
        self.nodes = list(self.graph)  # onnx_ir keeps graphs topologically sorted
        missing = sorted({f"{_domain(n) or 'ai.onnx'}::{n.op_type}" for n in self.nodes
                          if (_domain(n), n.op_type) not in OPS and n.op_type != "Constant"})
        if missing:
            raise UnsupportedOp(f"no torch evaluation for {', '.join(missing)}")
        self.constants = {name: to_torch(v.const_value) for name, v in self.graph.initializers.items()
                          if v.const_value is not None}
        for node in self.nodes:
            if node.op_type == "Constant":
                self.constants[node.outputs[0].name] = _constant(node)
        # nodes that read weights only (no graph input upstream): their results can be recomputed
        weight_side = set(self.constants)
        self.weight_nodes: set[int] = set()
        for i, node in enumerate(self.nodes):
            if node.op_type != "Constant" and node.inputs and all(v is None or v.name in weight_side for v in node.inputs):
                self.weight_nodes.add(i)
                weight_side.update(o.name for o in node.outputs if o.name)

    def __call__(self, feeds: Mapping[str, np.ndarray | torch.Tensor],
                 parameters: Mapping[str, torch.Tensor] | None = None,
                 outputs: list[str] | None = None) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(self.constants)
        env.update({k: torch.as_tensor(v) for k, v in feeds.items()})
        env.update(parameters or {})
        training = torch.is_grad_enabled() and any(p.requires_grad for p in (parameters or {}).values())
        if not (training and self.recompute):
            self._run(env, None)
        else:
            recompute: dict[int, tuple] = {}  # id(tensor) -> (weak reference, function that recomputes it)

            def pack(t):
                entry = recompute.get(id(t))
                return entry[1] if entry is not None and entry[0]() is t else t

            def unpack(x):
                return x() if isinstance(x, _Recompute) else x

            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                self._run(env, recompute)
        names = outputs or [v.name for v in self.graph.outputs]
        return [env[n] for n in names]

    def _run(self, env: dict[str, torch.Tensor], recompute: dict[int, tuple] | None) -> None:
        makers: dict[str, _Recompute] = {}  # weight-side value name -> its recomputation
        for i, node in enumerate(self.nodes):
            if node.op_type == "Constant" or all(o.name in env for o in node.outputs if o.name):
                continue
            args = [env[v.name] if v is not None and v.name else None for v in node.inputs]
            while args and args[-1] is None:
                args.pop()
            op = OPS[(_domain(node), node.op_type)]
            if recompute is not None and node.op_type == "DequantizeLinear" and len(args) >= 2 \
                    and args[1].requires_grad and not args[0].requires_grad:
                result = _DequantizeKeepingInputs.apply(node, args[0], args[1], args[2] if len(args) > 2 else None)
            else:
                result = op(node, *args)
            results = result if isinstance(result, (list, tuple)) else [result]
            for k, (value, r) in enumerate(zip(node.outputs, results)):
                if value.name and r is not None:
                    env[value.name] = r
                    if recompute is not None and i in self.weight_nodes and isinstance(r, torch.Tensor):
                        sources = [makers.get(v.name, env[v.name]) if v is not None and v.name else None
                                   for v in node.inputs[:len(args)]]
                        makers[value.name] = maker = _Recompute(op, node, sources, k)
                        if r.is_floating_point() and r.numel() >= RECOMPUTE_ELEMENTS:
                            recompute[id(r)] = (weakref.ref(r), maker)


class _Recompute:
    """A weight-side value computed again: its node's op on its inputs (recomputed in turn, or
    the initializers and parameters themselves), without gradient."""

    def __init__(self, op, node, sources, index):
        self.op, self.node, self.sources, self.index = op, node, sources, index

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            args = [s() if isinstance(s, _Recompute) else s for s in self.sources]
            result = self.op(self.node, *args)
        return result[self.index] if isinstance(result, (list, tuple)) else result

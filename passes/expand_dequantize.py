"""Expand weight DequantizeLinear into elementwise ops, the weights staying quantized.

For backends whose importer takes no blocked DequantizeLinear (TVM 0.27's Relax ONNX
frontend), each DequantizeLinear of a constant weight becomes integer storage plus a short
injective chain that the backend fuses into the weight's reader (MatMul):

    DequantizeLinear(Wq[.., D, ..], s[.., D/bs, ..], zp?, axis=a, block_size=bs)
  ->
    Reshape(Mul(Sub(Cast(Q), Cast(Z)), S), shape(Wq))
        Q [.., D/bs, bs, ..]  the values, the blocked axis split in two
        S, Z [.., D/bs, 1, ..] the scales and zero points (Sub left out without zero point)

    4-bit: Q = Reshape(BitwiseAnd(BitShift(P, [0, 4], RIGHT), 15))   (a shift per nibble)
        P [.., 1, L/2, ..] uint8: two values per byte along axis p of Q (the within-block
           axis a+1 when it is even, else the last even axis but the first), the first half
           of that axis in the low nibbles, the second half in the high ones; the shifts
           [2, 1, ..] broadcast against its axis of 1, and S, Z get an axis of 1 there too.
           int4 is stored offset by 8 (a nibble is unsigned), and its zero point with it
           (a constant 8 is subtracted when there is none). Not a Concat of the two
           halves: its select on the index, inlined into a matmul, defeats DLight's analysis.

A per-axis (block_size 0, 1-D scale) or per-tensor DequantizeLinear of a constant weight is
expanded the same way with Q = Wq and S, Z broadcast along the axis.

A Gather along axis 0 of a blocked table (an embedding, possibly tied with the LM head)
reads only the rows it needs:

    Gather(DequantizeLinear(Eq[V, H], s[V, H/bs], zp?, axis=1, block_size=bs), ids[...])
  ->
    Reshape(Mul(Sub(Cast(Gather(Q, ids)), Cast(Gather(Z, ids))), Gather(S, ids)), [...ids, H])

(with Q unpacked from Gather(P, ids) for 4 bits), so a decode step does not dequantize the
whole table. Every reader of one DequantizeLinear shares the same P, S, Z: a tied table is
stored once. Dims: D the quantized axis' length, bs the block size, V vocabulary, H hidden.

Compact scales (a weight's scale computed by a DequantizeLinear of constants, as
quantize-weights' `compact_scales` writes it) are folded to float32 scales first
(stat `scales_folded`): the chain then reads one constant S, as for any other weight.

Exact: (q - zp) is an exact float and the Mul rounds once, as DequantizeLinear does.
Stats: dequantize_expanded, packed_4bit (of them, 4-bit weights stored two per byte),
gathers_by_row (Gathers rewritten to dequantize their rows only), bytes_stored (P, S, Z).

Preconditions: none (4-bit types come with opset 21, which has BitShift and BitwiseAnd).
Not handled: DequantizeLinear of activations (not
constant) and of types other than int4/uint4/int8/uint8 are left as they are when not
blocked (importers take per-tensor/per-axis forms); a blocked one that cannot be expanded
(not constant, another type, D not a whole number of blocks, an output_dtype other than
the scale's) is an ExpandDequantizeError naming the node. 4-bit weights with no even axis
stay one value per byte (int8 storage), counted as not packed. Gathers on another axis, or
of tables not blocked along axis 1, read the whole dequantized table.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from kiln.errors import KilnError
from kiln.ir.values import new_initializer
from kiln.passes.base import KilnPass
from kiln.passes.quantization import compact_scale_parts
from kiln.passes.registry import register_pass

_BITS = {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8}
_SIGNED = (ir.DataType.INT4, ir.DataType.INT8)


class ExpandDequantizeError(KilnError):
    pass


@dataclasses.dataclass
class _Stored:
    """A weight's integer storage and how to turn it back into floats."""
    values: ir.Value  # Q, or P (packed 4-bit)
    scale: ir.Value  # S
    zero: ir.Value | None  # Z (integer), None without zero point (and for symmetric int4: see offset)
    offset: float  # subtracted when there is no Z: 8 for signed int4 stored as nibbles
    pack_axis: int | None  # the axis of P holding two values per byte; None if not packed
    shape: list[int]  # the weight's shape (DequantizeLinear's output)
    split: list[int]  # Q's shape
    rows_gatherable: bool  # axis 0 of Q, S, Z is the weight's axis 0, whole in each


@register_pass("expand-dequantize")
class ExpandDequantizePass(KilnPass):
    def call(self, model: ir.Model):
        graph = model.graph
        stats = {"dequantize_expanded": 0, "packed_4bit": 0, "gathers_by_row": 0, "bytes_stored": 0,
                 "scales_folded": _fold_compact_scales(graph)}
        for dq in [n for n in graph if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")]:
            stored = _store(graph, dq)
            if stored is None:
                continue
            stats["dequantize_expanded"] += 1
            stats["packed_4bit"] += stored.pack_axis is not None
            stats["bytes_stored"] += sum(v.const_value.nbytes for v in (stored.values, stored.scale, stored.zero)
                                         if v is not None)
            out, whole = dq.outputs[0], None
            for use in list(out.uses()):
                reader = use.node
                if (reader.op_type == "Gather" and use.idx == 0 and reader.attributes.get_int("axis", 0) == 0
                        and stored.rows_gatherable and reader.inputs[1].shape is not None):
                    rows = _gather_rows(graph, reader, stored)
                    _replace(reader.outputs[0], rows)
                    graph.remove(reader, safe=True)
                    stats["gathers_by_row"] += 1
                    continue
                if whole is None:
                    whole = _dequantize(graph, dq, stored, stored.values, stored.scale, stored.zero, stored.shape)
                    _copy_type(out, whole)
                reader.replace_input_with(use.idx, whole)
            if out.is_graph_output():
                _replace(out, whole or _dequantize(graph, dq, stored, stored.values, stored.scale, stored.zero,
                                                   stored.shape))
            old = [v for v in dq.inputs if v is not None]
            graph.remove(dq, safe=True)
            for value in old:  # the quantized tensors, now stored again as P, S, Z
                if value.is_initializer() and not value.uses() and not value.is_graph_output():
                    graph.initializers.pop(value.name)
        return self.result(model, modified=stats["dequantize_expanded"] > 0, stats=stats)


def _fold_compact_scales(graph: ir.Graph) -> int:
    """Replace each compact weight scale (quantize-weights' uint8 levels × step) by its float32 value."""
    folded = 0
    for dq in [n for n in graph if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")]:
        parts = compact_scale_parts(dq.inputs[1]) if len(dq.inputs) > 1 and dq.inputs[1] is not None else None
        if parts is None:
            continue
        inner = dq.inputs[1].producer()
        value = new_initializer(graph, inner.outputs[0].name or "scale", (parts[0] * parts[1]).astype(np.float32))
        inner.outputs[0].replace_all_uses_with(value)
        graph.remove(inner, safe=True)
        for v in inner.inputs:
            if v is not None and v.is_initializer() and not v.uses():
                graph.initializers.pop(v.name)
        folded += 1
    return folded


def _replace(old: ir.Value, new: ir.Value) -> None:
    _copy_type(old, new)
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if new.is_graph_output():
        new.name = old.name


def _copy_type(source: ir.Value, target: ir.Value) -> None:
    if source.dtype is not None:
        target.dtype = source.dtype
    if source.shape is not None:
        target.shape = source.shape


def _store(graph: ir.Graph, dq: ir.Node) -> _Stored | None:
    """The weight's new initializers, or None for a DequantizeLinear left as it is."""
    x, scale = dq.inputs[0], dq.inputs[1]
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    block = dq.attributes.get_int("block_size", 0)
    where = f"expand-dequantize: DequantizeLinear '{dq.name}'"
    tensors = [ir.convenience.get_const_tensor(v) if v is not None else None for v in (x, scale, zero)]
    constant = all(t is not None for t, v in zip(tensors, (x, scale, zero)) if v is not None)
    if not constant or tensors[0].dtype not in _BITS:
        if block:
            why = "reads a non-constant input" if not constant else f"has {tensors[0].dtype} values"
            raise ExpandDequantizeError(f"{where} {why}: only constant int4/uint4/int8/uint8 weights can be "
                                        "expanded, and the importer takes no blocked DequantizeLinear")
        return None
    q, s = tensors[0].numpy(), tensors[1].numpy()
    z = tensors[2].numpy() if tensors[2] is not None else None
    dtype, rank = tensors[0].dtype, q.ndim
    out_dtype = dq.attributes.get_int("output_dtype", 0)
    if out_dtype and ir.DataType(out_dtype) != tensors[1].dtype:
        raise ExpandDequantizeError(f"{where} has output_dtype {ir.DataType(out_dtype)} unlike its scale's "
                                    f"{tensors[1].dtype}: not supported")
    axis = dq.attributes.get_int("axis", 1)
    axis = axis + rank if axis < 0 else axis
    shape = list(q.shape)
    if block:
        if shape[axis] % block or s.shape[axis] != shape[axis] // block:
            raise ExpandDequantizeError(f"{where}: axis {axis} of length {shape[axis]} is not a whole number "
                                        f"of blocks of {block} (a partial last block is not supported)")
        split = shape[:axis] + [shape[axis] // block, block] + shape[axis + 1:]
        broadcast = list(s.shape[:axis]) + [s.shape[axis], 1] + list(s.shape[axis + 1:])
        prefer = [axis + 1]
        rows_gatherable = axis >= 1 and s.shape[0] == shape[0]
    else:
        split = shape
        if s.size == 1:  # per tensor
            broadcast = [1] * rank
        else:  # per axis: 1-D scale along `axis` (opset 13: a 1-element axis on a 1-D tensor is axis 0)
            axis = 0 if rank == 1 else axis
            broadcast = [1] * rank
            broadcast[axis] = s.size
        prefer = []
        rows_gatherable = False  # kiln quantizes per channel as one block spanning the axis: blocked
    q = q.reshape(split)
    s = s.reshape(broadcast)
    z = z.reshape(broadcast) if z is not None else None

    bits, signed = _BITS[dtype], dtype in _SIGNED
    offset = 0.0
    pack_axis = None
    if bits == 4:
        u = q.astype(np.int16) + (8 if signed else 0)  # nibbles are unsigned
        if z is not None:
            z = (z.astype(np.int16) + (8 if signed else 0)).astype(np.uint8)
        elif signed:
            offset = 8.0
        # axis 0 stays whole (unless it is the only one), so that a Gather of rows reads whole bytes
        candidates = prefer + [a for a in reversed(range(q.ndim)) if a > 0 or q.ndim == 1]
        pack_axis = next((a for a in candidates if q.shape[a] % 2 == 0), None)
        if pack_axis is None:
            q = u.astype(np.uint8)
        else:  # the halves of axis p as a new axis of 2 (one per nibble), then the bytes
            lo, hi = np.split(u.astype(np.uint8), 2, axis=pack_axis)
            q = np.expand_dims(lo | (hi << 4), pack_axis)
            s = np.expand_dims(s, pack_axis)
            z = np.expand_dims(z, pack_axis) if z is not None else None
    elif z is not None:
        z = z.astype(np.int8 if signed else np.uint8)
    values = new_initializer(graph, f"{x.name}.{'packed' if pack_axis is not None else 'blocks'}", q)
    scale_v = new_initializer(graph, f"{scale.name}.blocks", s)
    zero_v = new_initializer(graph, f"{zero.name}.blocks", z) if z is not None else None
    return _Stored(values, scale_v, zero_v, offset, pack_axis, shape, split, rows_gatherable)


def _dequantize(graph: ir.Graph, anchor: ir.Node, stored: _Stored, values: ir.Value, scale: ir.Value,
                zero: ir.Value | None, shape: list) -> ir.Value:
    """(values [- zero | - offset]) * scale, reshaped to `shape` (0 = the input's dim), before `anchor`."""
    build = _Builder(graph, anchor)
    if stored.pack_axis is not None:
        # [.., 1, L/2, ..] >> [0, 4]: [.., 2, L/2, ..]. The shifts' shape is aligned from the
        # right, so that it broadcasts over gathered rows (other leading dims) too.
        rank = len(stored.values.const_value.shape)
        shifts = np.array([0, 4], np.uint8).reshape([2] + [1] * (rank - stored.pack_axis - 1))
        values = build("BitwiseAnd", build("BitShift", values, build.const(shifts), direction="RIGHT"),
                       build.const(np.array(15, np.uint8)))
    dtype = stored.scale.const_value.dtype
    out = build("Cast", values, to=dtype)
    if zero is not None:
        out = build("Sub", out, build("Cast", zero, to=dtype))
    elif stored.offset:
        out = build("Sub", out, build.const(np.array(stored.offset, dtype.numpy())))
    out = build("Mul", out, scale)
    if shape != stored.split or stored.pack_axis is not None:
        out = build("Reshape", out, build.const(np.array(shape, np.int64)))
    return out


def _gather_rows(graph: ir.Graph, gather: ir.Node, stored: _Stored) -> ir.Value:
    """Gather the stored rows (values, scales, zero points), then dequantize only those."""
    build = _Builder(graph, gather)
    ids = gather.inputs[1]
    rows = [build("Gather", v, ids, axis=0) if v is not None else None
            for v in (stored.values, stored.scale, stored.zero)]
    # Reshape's 0 keeps the index dims (which may be symbolic)
    return _dequantize(graph, gather, stored, *rows, shape=[0] * len(ids.shape) + stored.shape[1:])


class _Builder:
    """Nodes inserted before `anchor`; small constants as initializers."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node):
        self.graph, self.anchor = graph, anchor

    def const(self, array: np.ndarray) -> ir.Value:
        return new_initializer(self.graph, f"{self.anchor.name or 'dq'}.const", array)

    def __call__(self, op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        node = ir.node(op_type, list(inputs), attributes=attributes, num_outputs=1)
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]

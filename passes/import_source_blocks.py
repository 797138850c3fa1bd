"""Import the weights the source stores block-quantized (a GGUF file's Q4_0, Q4_1, Q8_0, K-quants)
as they are, instead of quantizing their fp32 dequantization a second time.

    MatMul(A[..., K], W[K, N])
  ->
    MatMul(A, DequantizeLinear(q[K, N], s[K/bs, N], axis=0, block_size=bs))
      [+ MatMul(MatMul(A, S[K, K/bs]), m[K/bs, N])]          (S sums each block: S[k, b] = [k // bs = b])

    MatMul(A, Transpose(W[N, K]))  ->  the same with Transpose(DequantizeLinear(q[N, K], s[N, K/bs], axis=1, ...))
    Gather(E[V, H], ids)           ->  Gather(DequantizeLinear(q[V, H], s[V, H/bs], axis=1, block_size=bs), ids)

The source's formats are W = s·q + m per block of bs inputs (q signed 4- or 8-bit integers,
`SourceBlocks`). A format with an offset m (Q4_1, Q4_K, ...) adds the second term, Σ_b m[b, n]
times the sum of A over block b: a MatMul of 1/bs of the weight's work. Without an offset the
weight is exactly what `quantize-weights` writes for symmetric blocks, so the backends lower
both the same way (ORT: MatMulNBits and GatherBlockQuantized).

Where the blocks come from: the pipeline hands the pass the source's `BlockSource`
(`kiln.models.gguf_blocks.GGUFBlocks` for a .gguf file), which finds a weight's blocks by the
content of its rows, so packed or permuted weights are found too. A weight the source holds in
float, or that an earlier pass changed (smoothing, pruning), is not found and stays float for
`quantize-weights`. Exact: the dequantized weights are the float ones up to fp32 rounding.

A weight whose rows come from tensors of several formats (Q/K/V packed from Q4_K and Q6_K
tensors) is read as one MatMul per run of rows of one format, concatenated along N (read as
MatMul(A, W) only); the stats count each such part (`weights_imported`, `format_<name>`).

S and m are marked to stay float (`kiln.quantize.bits` = "32"), so quantize-weights leaves them.

Not handled (left float, reason recorded): a table with an offset read by a Gather, weights
read in other ways than the three forms above.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kiln.ir.values import new_initializer, unique_name
from kiln.passes.analysis.linear import weight_reads
from kiln.passes.base import KilnPass
from kiln.passes.quantization import BITS_HINT, DTYPES, require_opset
from kiln.passes.registry import register_pass


@dataclasses.dataclass
class SourceBlocks:
    """A weight as its source stores it, one row per output channel: W[n, k] = scale[n, k // block]
    · q[n, k] + offset[n, k // block] (no offset: None)."""

    format: str  # the source's name for it ("Q4_1")
    bits: int  # 4 or 8: the integers' storage
    block: int
    q: np.ndarray  # [N, K] int8, in the signed range of `bits`
    scale: np.ndarray  # [N, K/block] float32
    offset: np.ndarray | None  # [N, K/block] float32

    def dequantize(self) -> np.ndarray:
        s = np.repeat(self.scale, self.block, axis=1)
        w = s * self.q.astype(np.float32)
        return w if self.offset is None else w + np.repeat(self.offset, self.block, axis=1)

    @property
    def stored_bits(self) -> int:
        """Bits of values, scales (fp32) and offsets (fp32) as the graph stores them."""
        return self.q.size * self.bits + (self.scale.size + (0 if self.offset is None else self.offset.size)) * 32


class BlockSource(Protocol):
    def find(self, rows: np.ndarray) -> list[SourceBlocks] | None:
        """The blocks of a weight given as rows [N, K] (output channels × inputs), as consecutive
        parts of one format each (Q, K and V packed from tensors of two formats: two parts), or None."""


@register_pass("import-source-blocks")
class ImportSourceBlocksPass(KilnPass):
    uses_source_blocks = True

    def call(self, model: ir.Model):
        graph = model.graph
        if self.source_blocks is None:
            return self.result(model, modified=False, stats={"weights_imported": 0},
                               rejected=["the source stores no block-quantized weights"])
        rejected: list[str] = []
        formats: dict[str, int] = {}
        bits = params = 0
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or len(tensor.shape) != 2 or not tensor.dtype.is_floating_point():
                continue
            reads = weight_reads(value)
            if isinstance(reads, str):
                rejected.append(reads)
                continue
            transposed = {r.transposed for r in reads}
            if len(transposed) != 1:
                rejected.append(f"{value.name}: read both as [K, N] and transposed; left in float")
                continue
            transposed = transposed.pop()
            array = tensor.numpy()
            parts = self.source_blocks.find(array if transposed else array.T)
            if parts is None:
                continue
            names = "+".join(p.format for p in parts)
            if any(p.offset is not None for p in parts) and any(r.kind == "gather" for r in reads):
                rejected.append(f"{value.name}: a {names} table read by a Gather (its offsets are not imported); "
                                f"left in float")
                continue
            if len(parts) > 1 and transposed:
                rejected.append(f"{value.name}: rows of {names} read transposed; left in float")
                continue
            self._rewrite(graph, value, reads, parts, transposed)
            for p in parts:
                formats[p.format] = formats.get(p.format, 0) + 1
                bits += p.stored_bits
                params += p.q.size
        if params:
            require_opset(model, 21)
            RemoveUnusedNodesPass()(model)
        stats = {"weights_imported": sum(formats.values()), **{f"format_{k}": v for k, v in sorted(formats.items())},
                 "bits_per_weight": round(bits / max(params, 1), 3)}
        return self.result(model, modified=bool(params), stats=stats, rejected=rejected)

    @staticmethod
    def _rewrite(graph: ir.Graph, value: ir.Value, reads, parts: list[SourceBlocks], transposed: bool) -> None:
        base = value.name
        weights = [(_dequantized(graph, base if len(parts) == 1 else f"{base}.part{i}", p, transposed),
                    None if p.offset is None else _float_constant(graph, f"{base}.offset", p.offset.T), p.block)
                   for i, p in enumerate(parts)]
        if len(parts) == 1:
            weight, offset, block = weights[0]
            for r in reads:
                r.node.replace_input_with(r.index, weight)
                if offset is not None:
                    for mm in r.matmuls:
                        _add_offset_term(graph, mm, offset, block)
            return
        # rows of several formats (only as MatMul(A, W)): one MatMul per part, concatenated
        for r in reads:
            mm = r.node
            pieces = [ir.node("MatMul", [mm.inputs[0], w], num_outputs=1) for w, _, _ in weights]
            concat = ir.node("Concat", [m.outputs[0] for m in pieces], attributes={"axis": -1}, num_outputs=1)
            graph.insert_after(mm, [*pieces, concat])
            for m, (_, offset, block) in zip(pieces, weights):
                m.outputs[0].dtype = ir.DataType.FLOAT
                if offset is not None:
                    _add_offset_term(graph, m, offset, block)
            _take_over(graph, mm.outputs[0], concat.outputs[0])


def _dequantized(graph: ir.Graph, base: str, blocks: SourceBlocks, transposed: bool) -> ir.Value:
    """DequantizeLinear of the blocks, as [N, K] (transposed) or [K, N], before the graph's first node."""
    q, scale = (blocks.q, blocks.scale) if transposed else (blocks.q.T, blocks.scale.T)
    dq = ir.node("DequantizeLinear",
                 [new_initializer(graph, f"{base}.q{blocks.bits}", q, DTYPES[(blocks.bits, True)][0]),
                  new_initializer(graph, f"{base}.scale", scale)],
                 attributes={"axis": 1 if transposed else 0, "block_size": blocks.block}, num_outputs=1)
    out = dq.outputs[0]
    out.dtype, out.shape, out.name = ir.DataType.FLOAT, ir.Shape(list(q.shape)), unique_name(graph, f"{base}.dequantized")
    graph.insert_before(next(iter(graph)), dq)
    return out


def _add_offset_term(graph: ir.Graph, mm: ir.Node, offset: ir.Value, block: int) -> None:
    """y = MatMul(a, W) -> y + MatMul(MatMul(a, S), offset[K/bs, N]), S[K, K/bs] the 0/1 matrix that
    sums each block of inputs (any rank of a)."""
    k = offset.const_value.shape[0] * block
    indicator = (np.arange(k)[:, None] // block == np.arange(k // block)[None, :]).astype(np.float32)
    sums = ir.node("MatMul", [mm.inputs[0], _float_constant(graph, f"{offset.name}.block_sums", indicator)], num_outputs=1)
    term = ir.node("MatMul", [sums.outputs[0], offset], num_outputs=1)
    y = mm.outputs[0]
    add = ir.node("Add", [y, term.outputs[0]], num_outputs=1)
    graph.insert_after(mm, [sums, term, add])
    _take_over(graph, y, add.outputs[0])


def _take_over(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every reader of `old` (other than `new`'s producer) reads `new`, which takes over its name,
    type and place among the graph outputs."""
    new.dtype, new.shape = old.dtype, old.shape
    producer = new.producer()
    slots = [i for i, v in enumerate(producer.inputs) if v is old]
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    for i in slots:  # new's producer reads old itself
        producer.replace_input_with(i, old)
    name = old.name
    old.name = unique_name(graph, f"{name}.part")
    new.name = name


def _float_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """An initializer that quantize-weights leaves in float (the offsets are exact as they are)."""
    value = new_initializer(graph, name, array)
    value.metadata_props[BITS_HINT] = "32"
    return value

"""Weight-only quantization of MatMul weights and embedding tables, in standard ONNX (QDQ).

    MatMul(A[..., K], W[K, N])          ->  MatMul(A, DequantizeLinear(Wq[K, N], s[K/bs, N], zp?, axis=0, block_size=bs))
    MatMul(A, Transpose(W[N, K]))       ->  MatMul(A, Transpose(DequantizeLinear(Wq[N, K], s[N, K/bs], zp?, axis=1, block_size=bs)))
    Gather(E[V, H], ids)                ->  Gather(DequantizeLinear(Eq[V, H], s[V, H/bs], zp?, axis=1, block_size=bs), ids)

Dims: K input features, N output features, V vocabulary, H hidden, bs the block size along
the reduction axis (0 = one block spanning it, i.e. per output channel). Blocks always run
along K, so a tied embedding (one table read by the Gather and, transposed, by the LM head)
is quantized once and both readers share the same DequantizeLinear: backends can then keep
one copy of the table (ORT: MatMulNBits and GatherBlockQuantized on the same bytes).

Methods (`method`): "rtn" (round to nearest) or "gptq" (error feedback through the inverse
Hessian of the layer's calibration inputs, `act_order` to take the most used input features
first; see `kiln.passes.quantization`). `bits` 4, 8, or 7 (int8 storage with half the levels,
ORT's "reduce_range": integer GEMM kernels without VNNI overflow on full-range int8 weights);
`symmetric` gives signed values without zero point, else unsigned with one per block.

Mixed precision (`max_bits_per_weight` > 0): every weight's sensitivity is measured as its
relative output error at `bits` on the calibration inputs (‖X(W−Ŵ)‖²/‖XW‖²); the most
sensitive weights move to 8 bits, most sensitive first, while the average stored bits per
weight (values + scales, fp32 or compact + zero points) stays within the limit.

Hints from other passes (`kiln.passes.quantization`): a weight whose metadata sets
`kiln.quantize.bits` ("4" or "8") is quantized at those bits (split-table-rows marks a table's
frequent rows so), and one that sets "32" is left in float (import-source-blocks' minima); an
integer initializer marked `kiln.quantize.index` (the row-rank table of a split table, naming the
tables it indexes) is counted in the bits per weight and in the mixed-precision limit when one of
those tables is quantized. Weights quantized already (read as DequantizeLinear scales) are skipped.

Compact scales (`compact_scales`): each block scale is stored as uint8, a multiple of one fp32
step per output channel, dequantized by a DequantizeLinear of its own:

    DequantizeLinear(Wq, DequantizeLinear(s8[K/bs, N] uint8, step[N], axis=1), zp?, axis=0, block_size=bs)

8 bits per block instead of 32 (block 32 asymmetric: 4.375 bits per weight instead of
5.125); the quantizers choose the integers for the stored scale (`kiln.passes.quantization`).

Scale tuning (`tune_steps` > 0): after the integers are chosen, the block scales are trained
end to end on the calibration feeds against the float model's output (KL of the next-token
distribution for LMs), integers fixed; see `kiln.passes.scale_tuning`. With compact scales the
uint8 levels stay too and each output channel's fp32 step is trained (N numbers per weight
instead of K/bs·N). Same format and size.

Which weights: constant 2-D float initializers of at least `min_elements` elements whose
every reader is one of the three forms above. The LM head (a MatMul producing a graph
output) only with `include_lm_head`; embedding tables (Gather) only with `include_embedding`.

Lossy: declares KL divergence of the output distribution (mean over sample positions)
with a `budget`. Not handled: weights with more than two dims, Gemm (the exporter emits
MatMul), weights read in other ways (the reason is recorded).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kiln.ir.values import new_initializer, unique_name
from kiln.passes import calibration as calib
from kiln.passes.analysis.linear import weight_reads
from kiln.passes.base import KilnPass
from kiln.passes.quantization import (
    BITS_HINT,
    DTYPES,
    INDEX_HINT,
    bits_per_weight,
    compact_step,
    dequantize,
    gptq,
    output_error,
    output_error_terms,
    require_opset,
    rtn,
    storage_bits,
)
from kiln.passes.registry import register_pass

METHODS = ("rtn", "gptq")


@dataclasses.dataclass
class _Weight:
    value: ir.Value
    transposed: bool  # stored [N, K] (read through Transpose, or an embedding table [V, H])
    uses: list[tuple[ir.Node, int]]  # (reader, input index) to re-point at the dequantized weight
    inputs: list[ir.Value]  # the MatMuls' activations (for calibration)
    kinds: set[str]
    block: int = 0  # the block size along K (the pass's, or smaller for a table: see _candidate)
    bits: int = 0
    error: float = 0.0


@register_pass("quantize-weights")
class QuantizeWeightsPass(KilnPass):
    exact = False
    metric = "kl"

    def __init__(self, bits: int = 4, block_size: int = 32, symmetric: bool = True, method: str = "rtn",
                 include_lm_head: bool = True, include_embedding: bool = True, max_bits_per_weight: float = 0.0,
                 damp: float = 0.01, act_order: bool = False, min_elements: int = 4096, tune_steps: int = 0,
                 tune_lr: float = 0.002, compact_scales: bool = False, budget: float = 0.1):
        super().__init__()
        if bits not in (4, 7, 8):
            raise ValueError("bits must be 4, 7 (int8 storage, reduced range) or 8")
        if block_size < 0 or (block_size and (block_size < 16 or block_size & (block_size - 1))):
            raise ValueError("block_size must be 0 (per channel) or a power of two >= 16")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}")
        if max_bits_per_weight and bits == 7:
            raise ValueError("mixed precision (max_bits_per_weight) needs bits = 4")
        if max_bits_per_weight and not bits < max_bits_per_weight <= 8 + 64 / max(block_size, 16):
            raise ValueError("max_bits_per_weight must lie between bits and 8 (plus scales), or be 0 (off)")
        if not 0 <= damp < 1:
            raise ValueError("damp must be in [0, 1)")
        if tune_steps < 0 or not 0 < tune_lr < 1:
            raise ValueError("tune_steps must be >= 0 and tune_lr in (0, 1)")
        if compact_scales and not block_size:
            raise ValueError("compact_scales needs blocks (block_size > 0): per-channel scales are one per channel already")
        self.bits, self.block_size, self.symmetric, self.method = bits, block_size, symmetric, method
        self.include_lm_head, self.include_embedding = include_lm_head, include_embedding
        self.max_bits_per_weight, self.damp, self.min_elements, self.budget = max_bits_per_weight, damp, min_elements, budget
        self.act_order, self.tune_steps, self.tune_lr = act_order, tune_steps, tune_lr
        self.compact_scales = compact_scales
        self.uses_calibration = method == "gptq" or bool(max_bits_per_weight) or tune_steps > 0

    def call(self, model: ir.Model):
        graph = model.graph
        rejected: list[str] = []
        weights = [w for v in list(graph.initializers.values()) if (w := self._candidate(v, rejected)) is not None]
        # The float teacher's outputs are taken first (written to disk: no session stays open
        # while the Hessians and the quantized weights take memory).
        tuning = self._tuning_data(model) if self.tune_steps and weights else None
        needs_grams = self.method == "gptq" or bool(self.max_bits_per_weight)
        grams = self._grams(model, weights) if needs_grams and weights else {}

        quantized = {}
        last = {v.name: i for i, w in enumerate(weights) for v in w.inputs}  # the last weight reading each input
        for i, w in enumerate(weights):
            gram = _sum([grams[v.name] for v in w.inputs if v.name in grams])
            quantized[id(w)] = self._quantize(w, self._hinted_bits(w, rejected), gram)
            del gram
            for v in w.inputs:
                if last[v.name] == i and isinstance(grams, calib.Grams):
                    grams.release(v.name)  # summed again from disk if mixed precision needs it
        index_bits = _index_bits(graph, {w.value.name for w in weights}) if weights else 0
        if self.max_bits_per_weight:
            self._promote(weights, quantized, grams, rejected, index_bits)
        if isinstance(grams, calib.Grams):
            grams.close()
        del grams  # K×K float64 each: gigabytes for a model with wide MLPs

        bytes_before = bytes_after = 0
        scales = []
        first = next(iter(graph), None)
        for w in weights:
            q, scale, zero, step = quantized[id(w)]
            bytes_before += q.size * 4
            stored = storage_bits(w.bits)
            scale_bytes = scale.size + step.nbytes if step is not None else scale.nbytes
            bytes_after += q.size * stored // 8 + scale_bytes + (zero.size * stored // 8 if zero is not None else 0)
            nodes = self._dequantize_nodes(graph, w, q, scale, zero, step)
            dq = nodes[-1]
            # compact scales keep their uint8 levels: tuning trains the fp32 step of each channel
            scales.append(nodes[0].inputs[1] if step is not None else dq.inputs[1])
            for node in nodes:
                if first is not None:
                    graph.insert_before(first, node)
                else:
                    graph.append(node)
            for node, index in w.uses:
                node.replace_input_with(index, dq.outputs[0])
        if weights:
            require_opset(model, 21)
            RemoveUnusedNodesPass()(model)  # the float weights are no longer read
        n_params = sum(quantized[id(w)][0].size for w in weights)
        del quantized  # the initializers hold their own copies
        for w in weights:  # drop the float weights the graph no longer holds (they stay referenced here)
            if graph.initializers.get(w.value.name) is not w.value:
                w.value.const_value = None
        stats = {"weights_quantized": len(weights),
                 "matmuls": sum("matmul" in w.kinds for w in weights),
                 "embeddings": sum("gather" in w.kinds for w in weights),
                 "int8_weights": sum(w.bits == 8 for w in weights) if self.bits == 4 else len(weights),
                 "bits_per_weight": round((8 * bytes_after + index_bits) / max(n_params, 1), 3),
                 "mean_output_error": float(f"{np.mean([w.error for w in weights]):.3g}") if weights else 0.0,
                 "weight_mb_before": round(bytes_before / 1e6, 2), "weight_mb_after": round(bytes_after / 1e6, 2)}
        warnings = []
        if tuning is not None:
            from kiln.ir.torch_graph import UnsupportedOp
            from kiln.passes.scale_tuning import tune_scales

            try:
                stats.update(tune_scales(model, scales, *tuning, self.tune_steps, self.tune_lr))
            except UnsupportedOp as exc:  # raised before any scale changes
                warnings.append(f"scales not tuned: {exc}")
        return self.result(model, modified=bool(weights), stats=stats, rejected=rejected, warnings=warnings)

    # -- finding the weights ------------------------------------------------------------

    def _candidate(self, value: ir.Value, rejected: list[str]) -> _Weight | None:
        tensor = value.const_value
        if tensor is None or len(tensor.shape) != 2 or not tensor.dtype.is_floating_point():
            return None
        if tensor.size < self.min_elements or value.metadata_props.get(BITS_HINT) == "32":
            return None
        if all(u.node.op_type == "DequantizeLinear" and u.idx > 0 for u in value.uses()):
            return None  # the scales of weights quantized already (import-source-blocks)
        reads = weight_reads(value)
        if isinstance(reads, str):
            rejected.append(reads)
            return None
        kept = []
        for r in reads:
            if r.kind == "gather" and not self.include_embedding:
                continue
            if r.kind == "matmul" and r.head and not self.include_lm_head:
                rejected.append(f"{value.name}: LM head left in float (include_lm_head=false)")
                continue
            kept.append(r)
        uses = [(r.node, r.index) for r in kept]
        inputs = [m.inputs[0] for r in kept for m in r.matmuls]
        kinds = {r.kind for r in kept}
        orient = {r.transposed for r in kept}
        if not uses:
            return None
        if len(orient) > 1:
            rejected.append(f"{value.name}: read both as [K, N] and transposed; left in float")
            return None
        transposed = orient.pop()
        block = self.block_size
        width = tensor.shape[1] if transposed else tensor.shape[0]
        if "gather" in kinds and block and width % block:
            # a table's rows are read whole (GatherBlockQuantized wants whole blocks along H): the
            # largest block that divides H, else a tied table would be stored twice, packed for the
            # head and expanded for the Gather (SmolLM2, H = 576, blocks of 128: 23 MB more)
            fits = [b for b in (256, 128, 64, 32, 16) if b <= block and width % b == 0]
            if fits:
                block = fits[0]
                rejected.append(f"{value.name}: blocks of {block}, not {self.block_size}: the table's width {width} "
                                f"is not a whole number of blocks of {self.block_size}")
        return _Weight(value, transposed, uses, inputs, kinds, block)

    def _grams(self, model: ir.Model, weights: list[_Weight]) -> calib.Grams:
        feeds = calib.require(self.calibration, f"quantize-weights (method={self.method})")
        return calib.Grams(model, feeds, [v.name for w in weights for v in w.inputs])

    def _tuning_data(self, model: ir.Model):
        """(feeds, the float model as teacher, train indices, held-out indices), taken while the
        weights are still float."""
        # imported here: it loads torch, which nothing else needs when a model is not tuned
        from kiln.passes.scale_tuning import Teacher, split_feeds

        feeds = list(calib.require(self.calibration, "quantize-weights (tune_steps)"))
        return (feeds, Teacher(model, feeds), *split_feeds(len(feeds)))

    # -- quantizing -------------------------------------------------------------------

    def _quantize(self, w: _Weight, bits: int, gram: np.ndarray | None):
        """(q, scale, zero, compact scales' step or None) in [K, N] orientation; sets w.error,
        the relative output error."""
        array = w.value.const_value.numpy().astype(np.float32, copy=False)
        kn = array.T if w.transposed else array
        step = compact_step(kn, bits, w.block, self.symmetric) if self.compact_scales else None
        if self.method == "gptq" and gram is not None:
            q, scale, zero = gptq(kn, gram, bits, w.block, self.symmetric, self.damp, self.act_order,
                                  scale_step=step)
        else:
            q, scale, zero = rtn(kn, bits, w.block, self.symmetric, scale_step=step)
        w.bits = bits
        w.error = _output_error(kn, q, scale, zero, w.block, gram)
        return q, scale, zero, step

    def _hinted_bits(self, w: _Weight, rejected: list[str]) -> int:
        """The pass's bits, or those another pass asked for this weight (BITS_HINT)."""
        hint = w.value.metadata_props.get(BITS_HINT)
        if hint is None or hint == str(self.bits):
            return self.bits
        if hint not in ("4", "8"):
            rejected.append(f"{w.value.name}: bits hint {hint!r} ignored (4 or 8)")
            return self.bits
        rejected.append(f"{w.value.name}: {hint} bits (asked by the graph)")
        return int(hint)

    def _promote(self, weights: list[_Weight], quantized: dict, grams: calib.Grams, rejected: list[str],
                 index_bits: int) -> None:
        """Move the most sensitive weights to 8 bits while the average bits per weight allows."""
        def bpw(w, bits):
            k = (w.value.const_value.shape[1] if w.transposed else w.value.const_value.shape[0])
            return bits_per_weight(bits, w.block, k, self.symmetric, self.compact_scales)

        sizes = {id(w): w.value.const_value.size for w in weights}
        total = sum(sizes.values())
        stored = sum(sizes[id(w)] * bpw(w, w.bits) for w in weights) + index_bits
        for w in sorted(weights, key=lambda w: -w.error):
            if w.bits >= 8:
                continue
            extra = sizes[id(w)] * (bpw(w, 8) - bpw(w, self.bits))
            if (stored + extra) / total > self.max_bits_per_weight:
                continue
            error4 = w.error
            gram = _sum([grams[v.name] for v in w.inputs if v.name in grams])
            quantized[id(w)] = self._quantize(w, 8, gram)
            del gram
            for v in w.inputs:
                grams.release(v.name)
            stored += extra
            rejected.append(f"{w.value.name}: 8 bits (output error at {self.bits} bits {error4:.2e}, "
                            f"at 8 bits {w.error:.2e})")

    def _dequantize_nodes(self, graph: ir.Graph, w: _Weight, q, scale, zero, step) -> list[ir.Node]:
        """The weight's DequantizeLinear (last), after the one of its compact scales if any."""
        dtype = DTYPES[(w.bits, self.symmetric)][0]
        if w.transposed:  # stored as read: [N, K], blocks along axis 1
            q, scale, zero = q.T, scale.T, (zero.T if zero is not None else None)
        base = w.value.name

        nodes = []
        if step is None:
            scale_value = new_initializer(graph, f"{base}.scale", scale)
        else:  # the channel axis of the scale: N is axis 1 of [K/bs, N], axis 0 of [N, K/bs]
            levels = np.round(scale / (step[:, None] if w.transposed else step)).astype(np.uint8)
            scale_dq = ir.node("DequantizeLinear", [new_initializer(graph, f"{base}.scale_q8", levels, ir.DataType.UINT8),
                                                    new_initializer(graph, f"{base}.scale_step", step)],
                               attributes={"axis": 0 if w.transposed else 1}, num_outputs=1)
            scale_value = scale_dq.outputs[0]
            scale_value.dtype, scale_value.shape = ir.DataType.FLOAT, ir.Shape(list(scale.shape))
            scale_value.name = unique_name(graph, f"{base}.scale")
            nodes.append(scale_dq)
        inputs = [new_initializer(graph, f"{base}.q{w.bits}", q, dtype), scale_value]
        if zero is not None:
            inputs.append(new_initializer(graph, f"{base}.zero_point", zero, dtype))
        k = q.shape[1] if w.transposed else q.shape[0]
        attrs = {"axis": 1 if w.transposed else 0, "block_size": w.block or k}
        dq = ir.node("DequantizeLinear", inputs, attributes=attrs, num_outputs=1)
        dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(list(q.shape))
        dq.outputs[0].name = unique_name(graph, f"{base}.dequantized")
        return [*nodes, dq]


def _index_bits(graph: ir.Graph, quantized: set[str]) -> int:
    """Bits of the integer tables stored for quantized weights (split-table-rows' rank table):
    those whose INDEX_HINT names a quantized weight, or names none that still exists."""
    bits = 0
    for v in graph.initializers.values():
        served = v.metadata_props.get(INDEX_HINT)
        if served is None or v.const_value is None:
            continue
        names = set(served.split(","))
        if names & quantized or not names & set(graph.initializers):
            bits += v.const_value.nbytes * 8
    return bits


# Output columns per chunk when measuring a weight's output error: the float64 temporaries of a
# 150k-row embedding table would otherwise take several gigabytes at once.
ERROR_COLUMNS = 8192


def _output_error(kn: np.ndarray, q, scale, zero, block: int, gram: np.ndarray | None) -> float:
    """`output_error(kn, dequantize(q, scale, zero))`, a chunk of output columns at a time (columns
    are independent; only the order of the final sums differs)."""
    n = kn.shape[1]
    if n <= ERROR_COLUMNS:
        return output_error(kn, dequantize(q, scale, zero, block), gram)
    num = den = 0.0
    for j in range(0, n, ERROR_COLUMNS):
        cols = slice(j, j + ERROR_COLUMNS)
        a, b = output_error_terms(kn[:, cols], dequantize(q[:, cols], scale[:, cols],
                                                         None if zero is None else zero[:, cols], block), gram)
        num, den = num + a, den + b
    return float(num / max(den, 1e-30))


def _sum(arrays: list[np.ndarray]) -> np.ndarray | None:
    return sum(arrays[1:], arrays[0].copy()) if arrays else None

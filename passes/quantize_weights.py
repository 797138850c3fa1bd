"""Weight-only round-to-nearest (RTN) quantization of MatMul weights, in standard ONNX (QDQ).

    MatMul(A[..., K], W[K, N])                      (W a constant, possibly through a Transpose)
  ->
    MatMul(A, DequantizeLinear(Wq[K, N], scale[K/bs, N], zero_point?, axis=0, block_size=bs))

Dims: K input features, N output features, bs block size along K (0 = one scale per output
channel). `bits` 4 (int4/uint4) or 8 (int8/uint8); `symmetric` gives signed values and no zero
point, else unsigned with a zero point per block. The canonical form is plain ONNX (opset 21
blocked DequantizeLinear), so the IR stays portable; backends lower it (ORT: MatMulNBits).
The LM head (the MatMul that produces the logits output) is quantized only when
`include_lm_head` is true; with tied embeddings it reads the table through a Transpose, and
the Gather on the same table keeps reading the fp32 table.

Lossy: declares KL divergence of the next-token distribution (mean over sample positions)
with a `budget`. Not handled: MatMuls whose weight is an activation, weights with more than
two dims, Gemm (the exporter emits MatMul), embeddings (Gather).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kiln.passes.base import KilnPass
from kiln.passes.registry import register_pass

_DTYPES = {(4, True): (ir.DataType.INT4, ml_dtypes.int4, -8, 7), (4, False): (ir.DataType.UINT4, ml_dtypes.uint4, 0, 15),
           (8, True): (ir.DataType.INT8, np.int8, -128, 127), (8, False): (ir.DataType.UINT8, np.uint8, 0, 255)}


def quantize_rtn(w: np.ndarray, bits: int, block: int, symmetric: bool):
    """w [K, N] -> (q [K, N], scale [K/block, N], zero_point [K/block, N] or None); blocks along K."""
    k, n = w.shape
    bs = block or k
    blocks = -(-k // bs)
    padded = np.zeros((blocks * bs, n), dtype=np.float32)
    padded[:k] = w
    g = padded.reshape(blocks, bs, n)
    _, np_dtype, lo, hi = _DTYPES[(bits, symmetric)]
    if symmetric:
        scale = np.abs(g).max(axis=1) / hi
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        q = np.clip(np.round(g / scale[:, None]), lo, hi)
        zero = None
    else:
        gmin, gmax = np.minimum(g.min(axis=1), 0), np.maximum(g.max(axis=1), 0)
        scale = ((gmax - gmin) / (hi - lo)).astype(np.float32)
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        zero = np.clip(np.round(lo - gmin / scale), lo, hi)
        q = np.clip(np.round(g / scale[:, None]) + zero[:, None], lo, hi)
        zero = zero.astype(np_dtype)
    q = q.reshape(blocks * bs, n)[:k].astype(np_dtype)
    return q, scale, zero


def dequantize(q, scale, zero, block: int) -> np.ndarray:
    k = q.shape[0]
    bs = block or k
    s = np.repeat(scale, bs, axis=0)[:k]
    z = np.repeat(zero.astype(np.float32), bs, axis=0)[:k] if zero is not None else 0.0
    return (q.astype(np.float32) - z) * s


def _weight(node: ir.Node) -> tuple[np.ndarray, bool] | None:
    """The constant [K, N] weight of a MatMul, and whether it is read through a Transpose."""
    w = node.inputs[1]
    if w is None:
        return None
    producer = w.producer()
    transposed = False
    if producer is not None and producer.op_type == "Transpose":
        perm = producer.attributes.get_ints("perm", None)
        if perm not in (None, [1, 0], (1, 0)):
            return None
        w, transposed = producer.inputs[0], True
    if w.const_value is None or len(w.const_value.shape) != 2:
        return None
    array = w.const_value.numpy()
    return (array.T if transposed else array), transposed


@register_pass("quantize-weights")
class QuantizeWeightsPass(KilnPass):
    exact = False
    metric = "kl"

    def __init__(self, bits: int = 4, block_size: int = 32, symmetric: bool = True, include_lm_head: bool = True,
                 min_elements: int = 4096, budget: float = 0.1):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError("bits must be 4 or 8")
        if block_size < 0 or (block_size and (block_size < 16 or block_size & (block_size - 1))):
            raise ValueError("block_size must be 0 (per channel) or a power of two >= 16")
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.include_lm_head, self.min_elements, self.budget = include_lm_head, min_elements, budget

    def call(self, model: ir.Model):
        graph = model.graph
        quantized = skipped = 0
        bytes_before = bytes_after = 0
        rejected: list[str] = []
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            found = _weight(node)
            if found is None:
                continue
            w, transposed = found
            if w.size < self.min_elements:
                skipped += 1
                continue
            if not self.include_lm_head and any(o.is_graph_output() for o in node.outputs):
                rejected.append(f"{node.name}: LM head left in fp32 (include_lm_head=false)")
                skipped += 1
                continue
            dtype = _DTYPES[(self.bits, self.symmetric)][0]
            q, scale, zero = quantize_rtn(w.astype(np.float32), self.bits, self.block_size, self.symmetric)
            base = node.inputs[1].name or node.name
            tensors = {f"{base}.q{self.bits}": ir.tensor(q, dtype=dtype), f"{base}.scale": ir.tensor(scale)}
            if zero is not None:
                tensors[f"{base}.zero_point"] = ir.tensor(zero, dtype=dtype)
            inputs = [ir.val(_unique(graph, name), const_value=t) for name, t in tensors.items()]
            for v in inputs:
                graph.register_initializer(v)
            attrs = {"axis": 0}
            if self.block_size:
                attrs["block_size"] = self.block_size
            dq = ir.node("DequantizeLinear", inputs, attributes=attrs, num_outputs=1)
            dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(list(w.shape))
            graph.insert_before(node, dq)
            node.replace_input_with(1, dq.outputs[0])
            quantized += 1
            bytes_before += w.size * 4
            bytes_after += q.size * self.bits // 8 + scale.nbytes + (zero.size * self.bits // 8 if zero is not None else 0)
        if quantized:
            _require_opset(model, 21)
            RemoveUnusedNodesPass()(model)  # the fp32 weights (and Transposes) no longer read
        stats = {"matmuls_quantized": quantized, "matmuls_skipped": skipped,
                 "weight_mb_before": round(bytes_before / 1e6, 2), "weight_mb_after": round(bytes_after / 1e6, 2)}
        return self.result(model, modified=quantized > 0, stats=stats, rejected=rejected)


def _unique(graph: ir.Graph, name: str) -> str:
    candidate, i = name, 0
    while candidate in graph.initializers:
        i += 1
        candidate = f"{name}.{i}"
    return candidate


def _require_opset(model: ir.Model, version: int) -> None:
    """Blocked int4 DequantizeLinear needs opset 21. From 20, only types were added: bump it."""
    current = model.opset_imports.get("", 1)
    if current < 20:
        raise ValueError(f"quantize-weights needs opset >= 20 to upgrade to {version}, the model has {current}")
    model.opset_imports[""] = max(current, version)

"""Convert a float32 model to float16 (GPU targets), keeping numerically sensitive ops in fp32.

    W float32 initializer / Constant                 ->  W float16 (clipped to ±65504), unless
                                                        only kept ops read it
    every float32 value, graph inputs and outputs    ->  float16 (a KV cache too: half the memory)
    Cast(x, to=FLOAT)                                ->  Cast(x, to=FLOAT16)
    N in `keep_fp32` (norms, softmax, reductions)    ->  N on fp32 values, with Cast(to=FLOAT)
                                                        where an fp16 value enters the fp32 region
                                                        and Cast(to=FLOAT16) where one leaves it

Casts sit only on the edges between the two regions, so a chain of kept ops (e.g. an unfused
RMSNorm's Pow -> ReduceMean) stays in fp32 throughout instead of overflowing between them.
Fused ORT ops (SkipSimplifiedLayerNormalization, GroupQueryAttention, MultiHeadAttention, ...)
take fp16 and accumulate in fp32 inside their CUDA kernels, so they are converted; run
this after the fusions. Constants are clipped into the fp16 range, so a -3.4e38 mask
filler becomes -65504 rather than -inf (which would turn fully masked softmax rows into NaN).

The KV-cache layout in the model metadata (`kiln.kv_cache`) records dtype float16. Sample
and calibration feeds for float inputs are cast to float16 (`adapt_feeds`).

Lossy (fp16 rounding): metric max_rel (scale-relative max |Δ| of the outputs), `budget` 2e-2 by
default. Stats: initializers, values, casts, kept_fp32 (nodes left in fp32).
Not handled: subgraphs (If/Loop bodies), bfloat16, float64 models, ops whose fp16 kernel the
EP lacks (ORT's CPU EP inserts its own casts for those; the CUDA EP covers the ops kiln emits).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from kiln.ir import kv_layout, set_kv_layout
from kiln.ir.values import unique_name
from kiln.passes.base import KilnPass
from kiln.passes.registry import register_pass

KEEP_FP32 = ("LayerNormalization", "SimplifiedLayerNormalization", "Softmax", "LogSoftmax", "ReduceMean",
             "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceMax", "ReduceMin", "Pow",
             "Sqrt", "Reciprocal")
_F32, _F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
_FP16_MAX = float(np.finfo(np.float16).max)


def _to_fp16(tensor) -> ir.Tensor:
    array = np.clip(tensor.numpy(), -_FP16_MAX, _FP16_MAX).astype(np.float16)
    return ir.tensor(array, name=tensor.name)


def _casts_to(node: ir.Node, dtype: ir.DataType) -> bool:
    return node.op_type == "Cast" and node.attributes.get_int("to") == dtype


@register_pass("convert-float16")
class ConvertFloat16Pass(KilnPass):
    exact = False
    metric = "max_rel"

    def __init__(self, keep_fp32: list[str] | tuple[str, ...] = KEEP_FP32, budget: float = 2e-2):
        super().__init__()
        self.keep_fp32, self.budget = list(keep_fp32), budget

    def call(self, model: ir.Model):
        graph = model.graph
        keep = set(self.keep_fp32)
        fp32_nodes = {n for n in graph if n.op_type in keep and n.domain in ("", "ai.onnx")}
        # The casts into the fp32 region belong to it (so a second run finds nothing to do).
        fp32_nodes |= {n for n in graph if _casts_to(n, _F32) and all(u.node in fp32_nodes for u in n.outputs[0].uses())}
        initializers = values = 0
        for value in graph.initializers.values():
            if all(u.node in fp32_nodes for u in value.uses()):  # e.g. a norm's weights: no cast needed
                continue
            if value.const_value is not None and value.const_value.dtype == _F32:
                value.const_value = _to_fp16(value.const_value)
                value.dtype = _F16
                initializers += 1
        for value in graph.inputs:
            if value.dtype == _F32:
                value.dtype = _F16
                values += 1
        for node in graph:
            if node in fp32_nodes:
                continue
            if node.op_type == "Constant" and "value" in node.attributes:
                tensor = node.attributes["value"].as_tensor()
                if tensor.dtype == _F32:
                    node.attributes["value"] = ir.AttrTensor("value", _to_fp16(tensor))
            if _casts_to(node, _F32):
                node.attributes["to"] = ir.AttrInt64("to", int(_F16))
            for out in node.outputs:
                if out.dtype == _F32:
                    out.dtype = _F16
                    values += 1
        casts = self._bridge(graph, fp32_nodes)
        layout = kv_layout(model)
        if layout is not None and layout.dtype == "float":
            set_kv_layout(model, dataclasses.replace(layout, dtype="float16"))
        stats = {"initializers": initializers, "values": values, "casts": casts, "kept_fp32": len(fp32_nodes)}
        return self.result(model, modified=bool(initializers or values), stats=stats)

    @staticmethod
    def _bridge(graph: ir.Graph, fp32_nodes: set[ir.Node]) -> int:
        """Casts on the edges between fp16 producers and fp32 readers, and back."""
        casts = 0
        into: dict[ir.Value, ir.Value] = {}
        for node in list(graph):
            if node not in fp32_nodes:
                continue
            for index, value in enumerate(node.inputs):
                if value is None or value.dtype != _F16 or value.producer() in fp32_nodes:
                    continue
                if value not in into:
                    cast = ir.node("Cast", [value], attributes={"to": int(_F32)}, num_outputs=1)
                    cast.outputs[0].dtype, cast.outputs[0].shape = _F32, value.shape
                    cast.outputs[0].name = unique_name(graph, f"{value.name}.fp32")
                    graph.insert_before(node, cast)
                    into[value] = cast.outputs[0]
                    casts += 1
                node.replace_input_with(index, into[value])
            for out in node.outputs:
                if out.dtype != _F32:
                    continue
                readers = [(u.node, u.idx) for u in out.uses() if u.node not in fp32_nodes and not _casts_to(u.node, _F16)]
                if not readers and not out.is_graph_output():
                    continue
                cast = ir.node("Cast", [out], attributes={"to": int(_F16)}, num_outputs=1)
                cast.outputs[0].dtype, cast.outputs[0].shape = _F16, out.shape
                graph.insert_after(node, cast)
                casts += 1
                for reader, idx in readers:
                    reader.replace_input_with(idx, cast.outputs[0])
                if out.is_graph_output():  # the graph's outputs stay named as they were
                    name = out.name
                    out.name = unique_name(graph, f"{name}.fp32")
                    cast.outputs[0].name = name
                    graph.outputs[graph.outputs.index(out)] = cast.outputs[0]
                else:
                    cast.outputs[0].name = unique_name(graph, f"{out.name}.fp16")
        return casts

    def adapt_feeds(self, feeds: dict[str, np.ndarray], model: ir.Model) -> dict[str, np.ndarray]:
        fp16 = {v.name for v in model.graph.inputs if v.dtype == _F16}
        return {k: v.astype(np.float16) if k in fp16 and v.dtype == np.float32 else v for k, v in feeds.items()}

"""Check that a model fits a target that runs only listed ops on static shapes (NPUs).

    model  ->  the same model, or one KilnError line naming the first op outside the list
               and how many nodes use it (e.g. "op com.microsoft::GroupQueryAttention (30 nodes)
               is not on the qnn-htp allow-list")

Checks, in order:
1. every node's (domain, op_type) is on the allow-list `allowlist` (Constant nodes excepted:
   they are initializers by another name);
2. with `static=true`, every graph input and output has fixed dims, and a KV cache (model
   metadata `kiln.kv_cache`) is static: NPU graphs are compiled for one shape, and a growing
   cache changes shape every step.

Allow-lists are data (`ALLOWLISTS`), each with its source. `qnn-htp`: the "Supported ONNX
operators" table of ONNX Runtime's QNN execution provider (Qualcomm HTP), in
onnxruntime/onnxruntime-qnn docs/execution_providers/QNN-ExecutionProvider.md at commit
0131740f; it lists op types, not data types (e.g. HTP MatMul takes 8/16-bit unsigned
activations), which this check does not model. Never modifies the model; stats: nodes_checked,
op_types.
"""

from __future__ import annotations

import onnx_ir as ir

from kiln.errors import KilnError
from kiln.ir import kv_layout
from kiln.passes.base import KilnPass
from kiln.passes.registry import register_pass

_QNN_HTP_ONNX = """
Abs Add And ArgMax ArgMin Asin Atan AveragePool BatchNormalization Cast Ceil Clip Concat Conv
ConvInteger ConvTranspose Cos CumSum DepthToSpace DequantizeLinear DynamicQuantizeLinear Div
Einsum Elu Equal Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HardSigmoid
HardSwish Identity InstanceNormalization Inverse IsNaN LRN LSTM LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax LpNormalization MatMul MatMulInteger Max MaxPool Mean Min Mod Mul Neg
NonZero Not Or PRelu Pad Pow QuantizeLinear RandomNormalLike RandomUniformLike Reciprocal ReduceL2
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum Relu RMSNormalization Reshape Resize RoiAlign
Round RotaryEmbedding STFT ScatterElements ScatterND Sigmoid Sign Sin Slice Softmax Softplus
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Unsqueeze
Upsample Where
"""
_QNN_HTP_MICROSOFT = """
DequantizeLinear FusedMatMul Gelu MatMulNBits QuantizeLinear QuickGelu RotaryEmbedding
SimplifiedLayerNormalization
"""

ALLOWLISTS: dict[str, frozenset[tuple[str, str]]] = {
    "qnn-htp": frozenset({("", op) for op in _QNN_HTP_ONNX.split()}
                         | {("com.microsoft", op) for op in _QNN_HTP_MICROSOFT.split()}),
}


class TargetSupportError(KilnError):
    pass


def _qualified(domain: str, op: str) -> str:
    return f"{domain}::{op}" if domain else op


@register_pass("check-op-allowlist")
class CheckOpAllowlistPass(KilnPass):
    def __init__(self, allowlist: str = "qnn-htp", static: bool = True):
        super().__init__()
        if allowlist not in ALLOWLISTS:
            raise ValueError(f"unknown allow-list '{allowlist}' (known: {', '.join(ALLOWLISTS)})")
        self.allowlist, self.static = allowlist, static

    def call(self, model: ir.Model):
        allowed = ALLOWLISTS[self.allowlist]
        counts: dict[tuple[str, str], int] = {}
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            key = ("" if node.domain == "ai.onnx" else node.domain, node.op_type)
            counts[key] = counts.get(key, 0) + 1
        outside = sorted((k for k in counts if k not in allowed and k != ("", "Constant")), key=lambda k: -counts[k])
        if outside:
            more = f"; also {', '.join(_qualified(*k) for k in outside[1:4])}" if len(outside) > 1 else ""
            raise TargetSupportError(f"op {_qualified(*outside[0])} ({counts[outside[0]]} nodes) is not on the "
                                     f"{self.allowlist} allow-list{more}")
        if self.static:
            self._check_static(model)
        return self.result(model, modified=False, stats={"nodes_checked": sum(counts.values()),
                                                         "op_types": len(counts)})

    def _check_static(self, model: ir.Model) -> None:
        for value in [*model.graph.inputs, *model.graph.outputs]:
            shape = value.shape
            if shape is None or any(not isinstance(d, int) for d in shape):
                raise TargetSupportError(f"the target needs static shapes: '{value.name}' has shape "
                                         f"{list(shape) if shape is not None else 'unknown'}")
        layout = kv_layout(model)
        if layout is not None and not layout.static:
            raise TargetSupportError("the target needs a static KV cache (insert-kv-cache static_length=L, as in "
                                     "recipe npu-int8); this model's cache grows with every token")

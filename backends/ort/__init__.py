"""ONNX Runtime backend: lowering for a target, artifact files, configured sessions.

Artifact files written by this backend:
    model.onnx          the graph
    model.onnx.data     all weights (external data, one file)
Session settings (threads, graph optimization level, providers) come from the target
profile and are recorded in the manifest, so any runtime can reproduce them.

Lowering per target (`kiln.targets`):
- cpu: ORT's fused contrib ops (norms, GELU, GroupQueryAttention / MultiHeadAttention),
  MatMulNBits with int8 activations, DynamicQuantizeMatMul, quantized row gathers.
- gpu: the same fusions (each has a CUDA kernel) and MatMulNBits, then float16
  (`convert-float16`); no DynamicQuantizeMatMul (CPU-only). Providers CUDA, then CPU.
- npu: no contrib ops: the QDQ graph stays standard ONNX; the target's static shapes are
  fixed (`specialize-shapes`) and every op is checked against its allow-list.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort

# The runtime half (sessions) imports nothing of the compiler; the compiler half below imports
# onnx_ir and the passes where it uses them, so opening an artifact does not load them.
from kiln.backends.ort.session import _LEVELS, MODEL_FILE, PaddedSession, available_providers, create_session
from kiln.targets import Target

if TYPE_CHECKING:
    import onnx_ir as ir

    from kiln.passes.base import KilnPass

__all__ = ["MODEL_FILE", "OrtBackend", "PaddedSession", "available_providers", "create_session", "_LEVELS"]
_FUSIONS = ("fuse-rms-norm", "fuse-layer-norm", "fuse-gelu", "fuse-attention")
_CLEANUP = ("simplify", "eliminate-common-subexpressions", "eliminate-dead-code")


class OrtBackend:
    name = "ort"

    def lowering_passes(self, target: Target) -> list[KilnPass]:
        """Passes that turn kiln's portable IR into what ORT runs fastest on `target`."""
        from kiln.passes.registry import create_pass

        if target.device == "npu":
            return [create_pass("specialize-shapes", target.static_shapes),
                    *[create_pass(n) for n in _CLEANUP],
                    create_pass("check-op-allowlist", {"allowlist": target.op_allowlist})]
        fusions = [create_pass(n) for n in _FUSIONS]
        if target.device == "cuda":
            return [*fusions, create_pass("lower-matmul-nbits"), create_pass("gather-quantized-rows"),
                    *[create_pass(n) for n in _CLEANUP], create_pass("pack-attention-qkv"), create_pass("convert-float16")]
        # accuracy_level 4 (int8 activations) is what makes MatMulNBits fast on CPU (measured
        # on SmolLM2 int4: level 0 decodes barely faster than fp32); it is recorded as lossy.
        # Its kernels need compact scales folded at load, which a target without graph
        # optimizations does not do: such a target gets float32 scales.
        compact = target.graph_optimization_level != "disable"
        return [*fusions, create_pass("lower-matmul-nbits", {"accuracy_level": 4, "compact_scales": compact}),
                create_pass("lower-dynamic-quantize-matmul"), create_pass("gather-quantized-rows"),
                *[create_pass(n) for n in _CLEANUP], create_pass("pack-attention-qkv")]

    def write(self, model: ir.Model, directory: Path, target: Target) -> dict:
        from kiln.ir import kv_layout
        from kiln.ir.io import save_model

        save_model(model, directory / MODEL_FILE)
        session = {
            "providers": list(target.providers),
            "intra_op_num_threads": target.threads,
            "graph_optimization_level": target.graph_optimization_level,
        }
        if target.static_shapes and kv_layout(model) is not None:
            session["chunk"] = target.static_shapes["sequence"]  # the runtime feeds tokens in chunks
        elif target.static_shapes:
            session["padding"] = _padding(model, target.static_shapes["sequence"])
        return {
            "name": self.name,
            "onnxruntime_version": ort.__version__,
            "model": MODEL_FILE,
            "external_data": MODEL_FILE + ".data",
            "session": session,
        }


def _padding(model: ir.Model, sequence: int) -> dict:
    """How to serve any batch and shorter sequences with a batch-1 static graph: the inputs
    [1, sequence] are padded at the end (with zeros: masked tokens), outputs [1, sequence, ...]
    cut back, rows run one by one. (A static-cache LM is chunked by the runtime instead.)"""
    def per_token(v: ir.Value) -> bool:
        return v.shape is not None and len(v.shape) >= 2 and list(v.shape)[:2] == [1, sequence]

    return {"sequence": sequence, "inputs": [v.name for v in model.graph.inputs if per_token(v)],
            "outputs": [v.name for v in model.graph.outputs if per_token(v)]}

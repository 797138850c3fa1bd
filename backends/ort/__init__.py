"""ONNX Runtime backend: lowering for a target, artifact files, configured sessions.

Artifact files written by this backend:
    model.onnx          the graph
    model.onnx.data     all weights (external data, one file)
Session settings (threads, graph optimization level, provider) come from the target
profile and are recorded in the manifest, so any runtime can reproduce them.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

from kiln.ir.io import save_model
from kiln.passes.base import KilnPass
from kiln.passes.registry import create_pass
from kiln.targets import Target

MODEL_FILE = "model.onnx"

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_PROVIDERS = {"cpu": "CPUExecutionProvider"}


class OrtBackend:
    name = "ort"

    def lowering_passes(self, target: Target) -> list[KilnPass]:
        """Passes that turn kiln's portable IR into ORT's fused contrib ops for `target`."""
        # accuracy_level 4 (int8 activations) is what makes MatMulNBits fast on CPU (measured
        # on SmolLM2 int4: level 0 decodes barely faster than fp32); it is recorded as lossy.
        return [create_pass("fuse-rms-norm"), create_pass("fuse-layer-norm"), create_pass("fuse-gelu"),
                create_pass("fuse-attention"), create_pass("lower-matmul-nbits", {"accuracy_level": 4}),
                create_pass("lower-dynamic-quantize-matmul"), create_pass("gather-quantized-rows"),
                create_pass("simplify"), create_pass("eliminate-common-subexpressions"),
                create_pass("eliminate-dead-code")]

    def write(self, model: ir.Model, directory: Path, target: Target) -> dict:
        save_model(model, directory / MODEL_FILE)
        return {
            "name": self.name,
            "onnxruntime_version": ort.__version__,
            "model": MODEL_FILE,
            "external_data": MODEL_FILE + ".data",
            "session": {
                "providers": [_PROVIDERS[target.device]],
                "intra_op_num_threads": target.threads,
                "graph_optimization_level": target.graph_optimization_level,
            },
        }


def create_session(directory: Path, backend_manifest: dict, threads: int | None = None) -> ort.InferenceSession:
    """A session configured as the manifest says (`threads` overrides the thread count)."""
    settings = backend_manifest["session"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _LEVELS[settings.get("graph_optimization_level", "all")]
    opts.intra_op_num_threads = threads if threads is not None else settings.get("intra_op_num_threads", 0)
    opts.log_severity_level = 3
    return ort.InferenceSession(
        str(Path(directory) / backend_manifest["model"]), opts, providers=settings["providers"]
    )

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

import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from kiln.errors import KilnError
from kiln.ir import KV_CACHE_METADATA
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
_FUSIONS = ("fuse-rms-norm", "fuse-layer-norm", "fuse-gelu", "fuse-attention")
_CLEANUP = ("simplify", "eliminate-common-subexpressions", "eliminate-dead-code")


class OrtBackend:
    name = "ort"

    def lowering_passes(self, target: Target) -> list[KilnPass]:
        """Passes that turn kiln's portable IR into what ORT runs fastest on `target`."""
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
        save_model(model, directory / MODEL_FILE)
        session = {
            "providers": list(target.providers),
            "intra_op_num_threads": target.threads,
            "graph_optimization_level": target.graph_optimization_level,
        }
        if target.static_shapes and KV_CACHE_METADATA in model.metadata_props:
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


def available_providers(wanted: list[str]) -> tuple[list[str], list[str]]:
    """(the providers of `wanted` this ONNX Runtime build has, in order; those it lacks)."""
    have = set(ort.get_available_providers())
    return [p for p in wanted if p in have], [p for p in wanted if p not in have]


def create_session(directory: Path, backend_manifest: dict, threads: int | None = None) -> ort.InferenceSession:
    """A session configured as the manifest says (`threads` overrides the thread count).

    Providers this ONNX Runtime lacks (CUDA on a CPU-only machine) are skipped with one line
    on stderr, and the CPU EP runs the artifact: a gpu artifact still opens anywhere."""
    settings = backend_manifest["session"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _LEVELS[settings.get("graph_optimization_level", "all")]
    opts.intra_op_num_threads = threads if threads is not None else settings.get("intra_op_num_threads", 0)
    opts.log_severity_level = 3
    providers, missing = available_providers(settings["providers"])
    if missing:
        print(f"kiln: {', '.join(missing)} not available in this ONNX Runtime; running on "
              f"{', '.join(providers) or 'CPUExecutionProvider'}", file=sys.stderr)
    session = ort.InferenceSession(str(Path(directory) / backend_manifest["model"]), opts,
                                   providers=providers or ["CPUExecutionProvider"])
    return PaddedSession(session, settings["padding"]) if "padding" in settings else session


class PaddedSession:
    """An ORT session of a batch-1, fixed-length graph (target npu) that takes any batch and
    sequences up to its length, as `session["padding"]` in the manifest describes."""

    def __init__(self, session: ort.InferenceSession, padding: dict):
        self.session, self.length = session, padding["sequence"]
        self.inputs, self.outputs = set(padding["inputs"]), set(padding["outputs"])

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def get_providers(self):
        return self.session.get_providers()

    def run(self, names, feeds: dict) -> list[np.ndarray]:
        names = names or [o.name for o in self.get_outputs()]
        first = next(iter(self.inputs & set(feeds)))
        rows, seq = feeds[first].shape[:2]
        if seq > self.length:
            raise KilnError(f"this artifact takes at most {self.length} tokens (static shapes), got {seq}")
        results = []
        for row in range(rows):
            step = {k: np.pad(v[row:row + 1], [(0, 0), (0, self.length - seq)] + [(0, 0)] * (v.ndim - 2))
                    if k in self.inputs else v[row:row + 1] for k, v in feeds.items()}
            out = self.session.run(names, step)
            results.append([o[:, :seq] if n in self.outputs else o for n, o in zip(names, out)])
        return [np.concatenate(parts, axis=0) for parts in zip(*results)]

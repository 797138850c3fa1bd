"""ONNX Runtime sessions for an artifact, configured as its manifest says (the runtime half of
the ORT backend: numpy and onnxruntime only, nothing of the compiler)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kiln.backends.static import run_padded, run_rows
from kiln.manifest import artifact_path, session_threads

MODEL_FILE = "model.onnx"

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def available_providers(wanted: list[str]) -> tuple[list[str], list[str]]:
    """(the providers of `wanted` this ONNX Runtime build has, in order; those it lacks)."""
    have = set(ort.get_available_providers())
    return [p for p in wanted if p in have], [p for p in wanted if p not in have]


def create_session(directory: Path, backend_manifest: dict, threads: int | None = None,
                   initializers: dict[str, np.ndarray] | None = None) -> ort.InferenceSession:
    """A session configured as the manifest says (`threads` overrides the thread count).

    Providers this ONNX Runtime lacks (CUDA on a CPU-only machine) are skipped with one line
    on stderr, and the CPU EP runs the artifact: a gpu artifact still opens anywhere."""
    settings = backend_manifest["session"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _LEVELS[settings.get("graph_optimization_level", "all")]
    opts.intra_op_num_threads = threads if threads is not None else session_threads(settings)
    opts.log_severity_level = 3
    # initializers replaced at load (LoRA slots filled from adapters): ORT reads these buffers, so the
    # options keep them alive with the session
    replaced = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in (initializers or {}).values()]
    for name, value in zip(initializers or {}, replaced):
        opts.add_initializer(name, value)
    providers, missing = available_providers(settings["providers"])
    if missing:
        print(f"kiln: {', '.join(missing)} not available in this ONNX Runtime; running on "
              f"{', '.join(providers) or 'CPUExecutionProvider'}", file=sys.stderr)
    model = artifact_path(directory, backend_manifest["model"], "backend.model")
    if backend_manifest.get("external_data") is not None:
        artifact_path(directory, backend_manifest["external_data"], "backend.external_data")
    session = ort.InferenceSession(str(model), opts,
                                   providers=providers or ["CPUExecutionProvider"])
    session._kiln_initializers = replaced
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
        axes = {n: 1 for n in self.inputs | self.outputs}
        batch = {n: 0 for n in [*feeds, *(o.name for o in self.get_outputs())]}

        def one_row(row: dict) -> dict:
            return dict(zip(names, self.session.run(names, row)))

        out = run_rows(lambda row: run_padded(one_row, row, axes, self.length), feeds, batch)
        return [out[n] for n in names]

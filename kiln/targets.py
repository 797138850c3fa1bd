"""Deployment target profiles: where the artifact will run.

A profile is data that backends read to choose lowering passes and session settings; it
is recorded in the manifest (`target`).

- `cpu`: the host. fp32 compute (or whatever the recipe quantizes), ORT's CPU contrib ops
  (MatMulNBits with int8 activations, DynamicQuantizeMatMul, GroupQueryAttention, ...).
- `gpu`: CUDA. fp16 weights and compute (norms, softmax and reductions kept in fp32), only
  contrib ops that the CUDA EP implements, providers CUDA then CPU. Emitted and checked
  structurally where no GPU exists (the artifact still opens on the CPU EP).
- `npu`: NPU-style accelerators (e.g. Qualcomm HTP through ORT's QNN EP). Static shapes
  (batch 1, a fixed sequence chunk; causal LMs with a static KV cache whose length the
  recipe sets), int8 QDQ weights and calibrated activations (recipe `npu-int8`), standard
  ONNX ops only, each checked against the target's op allow-list. Validated numerically on
  the ORT CPU EP, which runs QDQ graphs as written.
"""

from __future__ import annotations

import dataclasses

from kiln.errors import KilnError
from kiln.manifest import host_cores


class TargetError(KilnError):
    pass


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    device: str  # "cpu" | "cuda" | "npu"
    threads: int  # intra-op threads; 0 lets the runtime decide
    graph_optimization_level: str  # "disable" | "basic" | "extended" | "all"
    providers: tuple[str, ...]  # ONNX Runtime execution providers, in order of preference
    precision: str  # "fp32" | "fp16" | "int8-qdq": what the target computes in
    default_recipe: str  # the preset used when no recipe is given
    static_shapes: dict[str, int] | None = None  # symbolic input dims fixed for the target
    op_allowlist: str | None = None  # a list of kiln.passes.check_op_allowlist, checked at compile time

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# NPU LLM runtimes (e.g. Qualcomm Genie's "AR-128" graphs) run a causal LM as fixed chunks of
# tokens over a static KV cache; encoders run at one fixed sequence length. 128 serves both:
# MiniLM at seq 128, SmolLM2 prefill in chunks of 128 (decode feeds a padded chunk).
NPU_SHAPES = {"batch": 1, "sequence": 128}

PROFILES = {
    "cpu": lambda: Target("cpu", "cpu", host_cores(), "all", ("CPUExecutionProvider",), "fp32", "fp32"),
    "gpu": lambda: Target("gpu", "cuda", 0, "all", ("CUDAExecutionProvider", "CPUExecutionProvider"), "fp16", "fp32"),
    # Optimizations off: the CPU EP is here to run the graph the NPU receives, as written. ORT's
    # QDQ rewrites (fusions into its integer kernels at "all", folding at "basic") move values
    # across quantization steps: max_rel 0.35 on tiny-llama at "all", 0.04 on MiniLM at "basic".
    "npu": lambda: Target("npu", "npu", host_cores(), "disable", ("CPUExecutionProvider",), "int8-qdq", "npu-int8",
                          dict(NPU_SHAPES), "qnn-htp"),
}


def get_target(name: str) -> Target:
    if name not in PROFILES:
        raise TargetError(f"unknown target '{name}' (available: {', '.join(PROFILES)})")
    return PROFILES[name]()

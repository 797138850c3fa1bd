"""kiln.passes: graph passes, their contract, the registry and the verified pipeline."""

from kiln.passes.base import KilnPass, KilnPassResult
from kiln.passes.pipeline import PipelineError, run_pipeline
from kiln.passes.registry import available_passes, create_pass, get_pass, register_pass

__all__ = [
    "KilnPass",
    "KilnPassResult",
    "PipelineError",
    "available_passes",
    "create_pass",
    "get_pass",
    "register_pass",
    "run_pipeline",
]

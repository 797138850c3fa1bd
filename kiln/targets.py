"""Deployment target profiles.

A profile says where the artifact will run; backends read it to choose lowering passes
and session settings. Only `cpu` is implemented so far: `gpu` and `npu` are named so
that asking for them gives a clear error instead of a silently wrong artifact.
"""

from __future__ import annotations

import dataclasses
import os

from kiln.errors import KilnError


class TargetError(KilnError):
    pass


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    device: str
    threads: int  # intra-op threads; 0 lets the runtime decide
    graph_optimization_level: str  # "disable" | "basic" | "extended" | "all"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _host_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def get_target(name: str) -> Target:
    if name == "cpu":
        return Target("cpu", "cpu", _host_threads(), "all")
    if name in ("gpu", "npu"):
        raise TargetError(f"target '{name}' is not implemented yet (available: cpu)")
    raise TargetError(f"unknown target '{name}' (available: cpu)")

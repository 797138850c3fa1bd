"""TVM backend: kiln's portable IR compiled by Apache TVM (Relax) into shared libraries.

Two halves: `kiln.backends.tvm.backend` (the compiler: lowering, Relax import, schedules,
tuning, artifact writing; imports onnx_ir, the passes and TVM's compiler) and
`kiln.backends.tvm.session` (the runtime: loads the libraries and runs them). This module
is light: it sets TVM's thread-pool environment and resolves the compiler's names
(`TvmBackend`, `host_target`, ...) on first use, so opening a TVM artifact imports neither
the passes nor torch.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

# TVM sizes its thread pool once, when a kernel first runs in parallel, at TVM_NUM_THREADS
# workers, else at half the cores on x86 (it assumes hyper-threading): one worker on a 2-core
# machine, where `runtime.config_threadpool(1, 2)` then still runs every kernel on one core
# (MiniLM measured 62.9 ms with 1.00 CPU per wall second). A pool of every core the process
# may use, before any kernel runs; the session then picks the number it runs on.
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
# Idle workers spin for a long while after a call (300,000 rounds by default), taking cores from
# whatever runs next in the process: MiniLM on ORT measured 30 ms right after a TVM call, 23 ms
# alone. 1,000 rounds free them at once and cost nothing measurable (SmolLM2 on TVM: decode
# 21.8 tok/s, against 19.9 with the default and 16.5 with no spinning at all).
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "1000")


def create_session(directory: Path, backend_manifest: dict, threads: int | None = None, files: dict | None = None):
    from kiln.backends.tvm.session import TvmSession

    return TvmSession(Path(directory), backend_manifest, threads, files=files)


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module("kiln.backends.tvm.backend"), name)

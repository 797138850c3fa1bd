"""kiln.backends: turn an optimized IR into a deployable artifact for a target.

A backend has `lowering_passes(target)` (appended to the recipe), `write(model, dir, target)`
(the artifact files; returns the manifest's `backend` section) and a module-level
`create_session(dir, backend_manifest, threads)`. A backend that needs static shapes also
has `static_cache_length` (the compiler makes the recipe's KV cache static with it) and
`check_feeds(model, feeds)` (sample inputs that exercise all of its compiled functions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from kiln.errors import KilnError

BACKENDS = ("ort", "tvm")


class BackendError(KilnError):
    pass


def get_backend(name: str, **options):
    if name == "ort":
        if options:
            raise BackendError(f"backend 'ort' takes no option '{next(iter(options))}' (--tune-minutes is for --backend tvm)")
        from kiln.backends.ort import OrtBackend

        return OrtBackend()
    if name == "tvm":
        from kiln.backends.tvm import TvmBackend

        return TvmBackend(**options)
    raise BackendError(f"unknown backend '{name}' (available: {', '.join(BACKENDS)})")


class Session(Protocol):
    """What `create_session` returns and the runtime drives, for every backend: ORT's
    InferenceSession, `ort.session.PaddedSession`, `tvm.session.TvmSession`. Names in, in the
    graph's order; numpy in, numpy out. A session that serves a KV cache also has
    `run_with_ort_values(names, feeds)`, whose values (with `.numpy()`) go back in as feeds
    without a copy. Static shapes are served by `kiln.backends.static`."""

    def get_inputs(self) -> list: ...  # objects with `.name`

    def get_outputs(self) -> list: ...

    def run(self, names: list[str] | None, feeds: dict) -> list: ...


def create_session(directory: Path, backend_manifest: dict, threads: int | None = None,
                   files: dict | None = None, initializers: dict | None = None) -> Session:
    """A session for the artifact, by the backend named in its manifest. `files` is the
    manifest's `files` record (sizes and sha256): a TVM library loads only if it matches."""
    name = backend_manifest.get("name", "ort")
    if name == "ort":
        from kiln.backends.ort import create_session as create
    elif name == "tvm":
        from kiln.backends.tvm import create_session as create
    else:
        raise BackendError(f"unknown backend '{name}' in the manifest (available: {', '.join(BACKENDS)})")
    if name == "tvm":
        if initializers:
            raise BackendError("LoRA adapters are loaded into ORT artifacts' slots; this is a TVM artifact")
        return create(Path(directory), backend_manifest, threads=threads, files=files)
    return create(Path(directory), backend_manifest, threads=threads, **({"initializers": initializers}
                                                                           if initializers else {}))

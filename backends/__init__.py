"""kiln.backends: turn an optimized IR into a deployable artifact for a target."""

from __future__ import annotations

from kiln.errors import KilnError


class BackendError(KilnError):
    pass


def get_backend(name: str):
    if name == "ort":
        from kiln.backends.ort import OrtBackend

        return OrtBackend()
    if name == "tvm":
        raise BackendError("backend 'tvm' is not implemented yet (available: ort)")
    raise BackendError(f"unknown backend '{name}' (available: ort)")

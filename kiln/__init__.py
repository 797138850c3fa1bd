"""kiln: an ahead-of-time compiler for transformer models.

The face is lazy: `kiln.compile`, `kiln.register_pass`, `KilnPass` and `KilnPassResult`
import the compiler (torch, onnx, the passes) on first use, and `kiln.load` imports only the
runtime. So `import kiln.runtime` (or `kiln.errors`, `kiln.targets`, `kiln.manifest`) on a
deployment box with only the runtime installed loads nothing of the compiler, and a pass
importing `kiln.errors` no longer runs this module's imports first.
"""

from __future__ import annotations

import importlib

from kiln.errors import KilnError, missing_extra

__version__ = "0.1.0"

# name -> (module, attribute); resolved on first use by __getattr__ below
_LAZY = {
    "register_pass": ("kiln.passes.registry", "register_pass"),
    "KilnPass": ("kiln.passes.base", "KilnPass"),
    "KilnPassResult": ("kiln.passes.base", "KilnPassResult"),
}


def compile(*args, draft: bool = False, **kwargs):  # noqa: A001 - the public name mirrors the CLI verb
    """kiln.compiler.compile; with `draft`, kiln.draft.compile_with_draft (a draft bundled in the artifact)."""
    try:
        if draft:
            from kiln.draft import compile_with_draft as _compile
        else:
            from kiln.compiler import compile as _compile
    except ModuleNotFoundError as exc:
        error = missing_extra(exc, "kiln.compile")
        if error is exc:
            raise
        raise error from exc
    return _compile(*args, **kwargs)


def load(path, **kwargs):
    from kiln.runtime import load as _load

    return _load(path, **kwargs)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'kiln' has no attribute '{name}'")
    module, attribute = _LAZY[name]
    try:
        value = getattr(importlib.import_module(module), attribute)
    except ModuleNotFoundError as exc:
        error = missing_extra(exc, f"kiln.{name}")
        if error is exc:
            raise
        raise error from exc
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = ["KilnError", "KilnPass", "KilnPassResult", "__version__", "compile", "load", "register_pass"]

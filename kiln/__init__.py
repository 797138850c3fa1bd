"""kiln: an ahead-of-time compiler for transformer models."""

__version__ = "0.1.0"

from kiln.errors import KilnError  # noqa: E402
from kiln.passes.registry import register_pass  # noqa: E402
from kiln.passes.base import KilnPass, KilnPassResult  # noqa: E402


def compile(*args, **kwargs):  # noqa: A001 - the public name mirrors the CLI verb
    from kiln.compiler import compile as _compile

    return _compile(*args, **kwargs)


def load(path, **kwargs):
    from kiln.runtime import load as _load

    return _load(path, **kwargs)


__all__ = ["KilnError", "KilnPass", "KilnPassResult", "__version__", "compile", "load", "register_pass"]

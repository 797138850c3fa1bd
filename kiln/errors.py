"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class KilnError(Exception):
    """Base class of every expected failure (bad input, failed check, missing model)."""


class CompilerNotInstalled(KilnError, ImportError):
    """A compile-time feature used where only the runtime is installed (`pip install kiln`)."""


# Top-level modules that only the `compile` extra installs (pyproject.toml).
COMPILE_MODULES = frozenset({
    "torch", "transformers", "safetensors", "gguf", "accelerate", "onnx", "onnx_ir", "onnxscript",
    "networkx", "ml_dtypes", "tvm", "tvm_ffi", "cloudpickle", "xgboost",
})


def missing_extra(exc: ModuleNotFoundError, what: str) -> Exception:
    """The error to raise for `exc`: one line naming the `compile` extra when the missing module
    is the compiler's, else `exc` itself (a real bug, not an install choice)."""
    name = (exc.name or "").split(".")[0]
    if name not in COMPILE_MODULES:
        return exc
    return CompilerNotInstalled(f"{what} needs the compiler, which is not installed here (no module '{name}'): "
                                f"install the compile extra, pip install 'kiln[compile]'")

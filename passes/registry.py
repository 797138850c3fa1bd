"""The pass registry: the only global state in kiln's pass machinery.

Built-in passes register with `@register_pass("name")` when their module is imported.
Installed plugins declare an entry point in the `kiln.passes` group whose name is the
pass name and whose object is a KilnPass subclass (or a module that registers passes).
"""

from __future__ import annotations

import importlib
import importlib.metadata

from kiln.errors import KilnError
from kiln.passes.base import KilnPass

_REGISTRY: dict[str, type[KilnPass]] = {}
_BUILTIN_MODULES = (
    "kiln.passes.fold_constants",
    "kiln.passes.eliminate_dead_code",
    "kiln.passes.eliminate_common_subexpressions",
    "kiln.passes.simplify",
    "kiln.passes.insert_kv_cache",
    "kiln.passes.fuse_rms_norm",
    "kiln.passes.fuse_layer_norm",
    "kiln.passes.fuse_gelu",
    "kiln.passes.fuse_attention",
    "kiln.passes.pack_attention_qkv",
    "kiln.passes.pack_matmuls",
    "kiln.passes.rotate_residual",
    "kiln.passes.smooth_activations",
    "kiln.passes.split_table_rows",
    "kiln.passes.import_source_blocks",
    "kiln.passes.quantize_weights",
    "kiln.passes.lower_matmul_nbits",
    "kiln.passes.lower_dynamic_quantize_matmul",
    "kiln.passes.gather_quantized_rows",
    "kiln.passes.factorize_low_rank",
    "kiln.passes.prune_mlp",
    "kiln.passes.prune_heads",
    "kiln.passes.drop_layers",
    "kiln.passes.distill",
    "kiln.passes.specialize_shapes",
    "kiln.passes.expand_dequantize",
    "kiln.passes.transpose_weights",
    "kiln.passes.quantize_activations",
    "kiln.passes.check_op_allowlist",
    "kiln.passes.convert_float16",
)
_loaded = False


class UnknownPassError(KilnError):
    pass


def printable(text) -> str:
    """A name from user input, made safe for a one-line error: control characters (a newline in a
    recipe's pass name) and lone surrogates are escaped, everything else is kept as it is."""
    text = str(text)
    return "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else repr(c)[1:-1] for c in text)


def register_pass(name: str):
    """Class decorator: make a KilnPass available to recipes under `name`."""

    def decorator(cls: type[KilnPass]) -> type[KilnPass]:
        if not (isinstance(cls, type) and issubclass(cls, KilnPass)):
            raise TypeError(f"@register_pass('{name}') needs a KilnPass subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"pass name '{name}' is already registered by {existing.__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in importlib.metadata.entry_points(group="kiln.passes"):
        try:
            obj = ep.load()
        except Exception as exc:
            raise KilnError(f"plugin pass '{ep.name}' ({ep.value}) failed to load: {exc}") from exc
        if isinstance(obj, type) and issubclass(obj, KilnPass) and ep.name not in _REGISTRY:
            register_pass(ep.name)(obj)


def available_passes() -> dict[str, type[KilnPass]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[KilnPass]:
    passes = available_passes()
    if name not in passes:
        raise UnknownPassError(f"unknown pass '{printable(name)}' (known: {', '.join(passes)})")
    return passes[name]


def create_pass(name: str, params: dict | None = None) -> KilnPass:
    cls = get_pass(name)
    params = dict(params or {})
    allowed = cls.parameter_names()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no parameters"
        raise UnknownPassError(f"pass '{name}' has no parameter '{printable(unknown[0])}' (it takes: {takes})")
    try:
        cls.check_parameters(params)
    except ValueError as exc:
        raise UnknownPassError(f"pass '{name}': {exc}") from exc
    try:
        return cls(**params)
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise UnknownPassError(f"pass '{name}': invalid parameters: {exc}") from exc

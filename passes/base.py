"""The kiln pass contract, on top of `onnx_ir.passes`.

A kiln pass is an `onnx_ir.passes.InPlacePass` whose `call` returns a `KilnPassResult`:
the usual `PassResult(model, modified)` plus `stats` (counters of what it did) and
`rejected` (one human-readable reason per candidate it chose not to rewrite) and
`warnings` (for the user: e.g. a fusion that fired on fewer layers than the model has).

Every pass declares its numeric contract, which the pipeline checks on sample inputs:
- exact passes (`exact = True`): outputs stay within `budget` (relative error, 1e-4), or
  within 10x the float32 rounding noise of a model that amplifies rounding more (the pipeline);
- lossy passes (`exact = False`): declare `metric` (see `kiln.passes.numerics.METRICS`)
  and a `budget`; the pipeline records the measured value and fails over budget.

Constructor arguments are the pass's parameters: a pass stores each under the same
attribute name, so recipes can set them and records can report them.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from typing import Any, ClassVar

import onnx_ir as ir


@dataclasses.dataclass
class KilnPassResult(ir.passes.PassResult):
    stats: dict[str, int | float] = dataclasses.field(default_factory=dict)
    rejected: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)


class KilnPass(ir.passes.InPlacePass):
    name: ClassVar[str] = ""  # set by @register_pass
    exact: ClassVar[bool] = True
    metric: ClassVar[str] = "max_rel"
    budget: float = 1e-4
    # Data-aware passes set this; the pipeline then sets `self.calibration` (a list of feed
    # dicts for the current model, see kiln.passes.calibration) before calling the pass.
    uses_calibration: ClassVar[bool] = False
    calibration: list | None = None
    # Passes that read the source's own quantized weights set this; the pipeline then sets
    # `self.source_blocks` (a `kiln.passes.import_source_blocks.BlockSource`, or None).
    uses_source_blocks: ClassVar[bool] = False
    source_blocks: Any = None
    # Passes that learn from the source model set this (with uses_calibration); the pipeline then
    # sets `self.teacher` (a `kiln.passes.scale_tuning.Teacher`: the source's first output on each
    # calibration feed, computed before the first pass).
    uses_teacher: ClassVar[bool] = False
    teacher: Any = None

    @classmethod
    def parameter_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    # Numeric parameters are counts, sizes and non-negative amounts unless a pass lists them here
    # (a plugin's offset, say): those may be negative. NaN and infinity are never accepted.
    signed_parameters: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def parameter_types(cls) -> dict[str, Any]:
        """Each parameter's annotation, resolved (a parameter without one, or one that cannot be
        resolved, maps to Any: any value is passed on to the constructor)."""
        names = cls.parameter_names()
        try:
            hints = typing.get_type_hints(cls.__init__)
        except Exception:  # an annotation naming something not importable here
            hints = {}
        return {n: hints.get(n, Any) for n in names}

    @classmethod
    def check_parameters(cls, params: dict[str, Any]) -> None:
        """Refuse a parameter whose value does not fit its annotation, or a negative or non-finite
        number, with a ValueError naming the parameter, the expected type and the value. Called
        by `create_pass` for every pass, plugins included, before the constructor runs."""
        types_ = cls.parameter_types()
        for key, value in params.items():
            expected = types_.get(key, Any)
            if not _fits(value, expected):
                raise ValueError(f"parameter '{key}' must be {_describe(expected)}, got {_shown(value)} "
                                 f"({type(value).__name__})")
            for number in _numbers(value):
                if not math.isfinite(number):
                    raise ValueError(f"parameter '{key}' must be a finite number, got {_shown(value)}")
                if number < 0 and key not in cls.signed_parameters:
                    raise ValueError(f"parameter '{key}' must be >= 0, got {_shown(value)}")

    @property
    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.parameter_names() if hasattr(self, k)}

    def result(
        self,
        model: ir.Model,
        *,
        modified: bool,
        stats: dict[str, int | float] | None = None,
        rejected: list[str] | None = None,
        warnings: list[str] | None = None,
    ) -> KilnPassResult:
        return KilnPassResult(model, bool(modified), dict(stats or {}), list(rejected or []), list(warnings or []))

    def coverage(self, what: str, fused: int, seen: int, reasons: list[str]) -> list[str]:
        """A warning when a fusion fired on fewer sites than the model has, with the reasons."""
        if fused >= seen:
            return []
        why = "; ".join(dict.fromkeys(reasons[:3])) or "no rule matched (pattern not recognised)"
        return [f"{what} fused on {fused}/{seen}: {why}"]

    def adapt_feeds(self, feeds: dict, model: ir.Model) -> dict:
        """Sample inputs for the model this pass produced, given those of the model before.

        Passes that change the I/O signature (e.g. adding a KV cache) override this so the
        pipeline can keep checking numerics; outputs are compared by name.
        """
        return feeds

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name or type(self).__name__}({args})"


def _fits(value: Any, expected: Any) -> bool:
    """Whether a recipe value (TOML: str, int, float, bool, list, dict, datetime) fits an annotation."""
    if expected is Any or expected is inspect.Parameter.empty or expected is object:
        return True
    if expected is type(None) or expected is None:
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:  # a whole number is a fine float (budget = 1)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(expected))
    if origin is typing.Literal:
        return value in typing.get_args(expected)
    if origin in (list, tuple, set, frozenset) or expected in (list, tuple, set, frozenset):
        if not isinstance(value, list):  # TOML has arrays only; the constructor converts them
            return False
        args = [a for a in typing.get_args(expected) if a is not Ellipsis]
        if origin is tuple and len(args) > 1 and Ellipsis not in typing.get_args(expected):
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return all(_fits(v, args[0]) for v in value) if args else True
    if origin is dict or expected is dict:
        if not isinstance(value, dict):
            return False
        args = typing.get_args(expected)
        return all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items()) if args else True
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True  # an annotation kiln cannot interpret: the constructor decides


def _describe(expected: Any) -> str:
    names = {bool: "true or false (bool)", int: "a whole number (int)", float: "a number (float)",
             str: "a string (str)", type(None): "absent (None)", list: "a list", dict: "a table (dict)"}
    if expected in names:
        return names[expected]
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in typing.get_args(expected) if a is not type(None)))
    if origin in (list, tuple, set, frozenset):
        args = [a for a in typing.get_args(expected) if a is not Ellipsis]
        return f"a list of {getattr(args[0], '__name__', args[0])}" if args else "a list"
    if origin is dict:
        return "a table (dict)"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(expected))
    return getattr(expected, "__name__", str(expected))


def _numbers(value: Any):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def fingerprint(model: ir.Model) -> tuple:
    """Structure of the graph (ops and their input wiring, initializers, outputs), cheap to compare.

    Wrapped third-party passes report `modified` loosely (shape annotations count for
    some); kiln's `modified` means the structure changed, decided by this fingerprint.
    """
    nodes = tuple(
        (n.domain, n.op_type, tuple(v.name if v is not None else "" for v in n.inputs), len(n.outputs))
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    return (nodes, len(model.graph.initializers), len(model.graph.outputs))

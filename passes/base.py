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

    @classmethod
    def parameter_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

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

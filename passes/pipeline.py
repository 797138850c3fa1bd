"""The pipeline runner: run passes in order and make each one prove itself.

For every pass it
1. times the pass and keeps its stats and rejection reasons,
2. checks the contract (a KilnPassResult, modified is a bool, `modified=False` only if the
   graph is unchanged),
3. runs `kiln.ir.verify`,
4. runs the fixed sample inputs through ORT and compares with the stage before
   (`delta`) and with the source (`delta_total`); exact passes must stay within their
   budget (rtol 1e-4, scale-relative) or, on a model that amplifies float32 rounding more
   than that, within 10x its measured rounding noise (one ulp on every weight; recorded as
   `rounding_noise`), lossy passes within their declared metric's budget.

With a `checkpoint` (the compiler's parity gate against the source model), it is called once
with the model and the names of the passes run so far, just before the first lossy pass
(or after the last pass when all are exact); what it returns is `PipelineRun.checkpoint`.

With a quality budget (`kiln.passes.quality`), the source is measured once and the model
again after every lossy pass that changed it; the value goes into that pass's record and
the first pass over the limit stops the pipeline.

Any failure raises PipelineError naming the pass and the passes before it. The records
(`{name, params, modified, stats, seconds, delta, ...}`) end up in the artifact manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kiln.errors import KilnError
from kiln.ir import VerificationError, verify
from kiln.passes.base import KilnPass, KilnPassResult, fingerprint
from kiln.passes.numerics import compare, rounding_noise, run_ort, within_budget
from kiln.passes.quality import QualityBudget


class PipelineError(KilnError):
    pass


class BudgetExceeded(PipelineError):
    """A lossy pass over its own budget or over the compile's quality budget: the recipe asked
    for more loss than allowed, which is a verdict on the recipe, not a fault."""


# An exact pass over its fixed budget passes if it stays within this multiple of the model's
# own rounding noise (`kiln.passes.numerics.rounding_noise`): reordering float arithmetic moves
# outputs by about one noise unit, a real change by orders of magnitude more.
NOISE_MULTIPLE = 10


@dataclasses.dataclass
class PipelineRun:
    model: ir.Model
    records: list[dict[str, Any]]
    feeds: dict[str, np.ndarray] | None  # sample inputs for the final model's signature
    quality: dict[str, Any] | None = None  # {"metric", "limit", "source", "final"} with a budget
    checkpoint: Any = None  # what the checkpoint callback returned


def _round(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(f"{v:.4g}") for k, v in metrics.items()}


def run_pipeline(
    model: ir.Model,
    passes: Sequence[KilnPass],
    sample_inputs: dict[str, np.ndarray] | None,
    *,
    calibration: list[dict[str, np.ndarray]] | None = None,
    source_blocks: Any = None,
    quality: QualityBudget | None = None,
    progress: bool = True,
    console=None,
    checkpoint: Callable[[ir.Model, list[str]], Any] | None = None,
) -> PipelineRun:
    """Run `passes` over `model` in place. Returns the model, the records and the final feeds.

    With `sample_inputs=None` the numeric check is skipped and recorded as such.
    `calibration` (feed dicts of real text) is handed to data-aware passes and adapted
    through signature-changing passes like the sample inputs; passes that learn from the
    source get its outputs on those feeds, computed before the first pass. `source_blocks` (the weights the
    source stores block-quantized, a `BlockSource`) is handed to passes that read them.
    """
    records: list[dict[str, Any]] = []
    quality_summary = None
    if quality is not None:
        measured = quality.measure(model)
        quality_summary = {"metric": quality.metric, "limit": quality.limit, "source": measured, "final": measured}
    try:
        source_outputs = run_ort(model, sample_inputs) if sample_inputs is not None else None
    except Exception as exc:  # e.g. an op or dtype ORT has no CPU kernel for (bfloat16 arithmetic)
        raise PipelineError(f"the source graph does not run in ONNX Runtime, so no pass can be checked: "
                            f"{_first_line(exc)}") from exc
    trace_rss("source outputs")
    teacher = None
    if calibration and any(p.uses_teacher for p in passes):
        from kiln.passes.scale_tuning import Teacher  # loads torch: only when a pass learns from the source

        teacher = Teacher(model, calibration)
    previous_outputs = source_outputs
    done: list[str] = []
    checked: list[Any] = []  # the checkpoint's result, once it has run

    bar = (
        Progress(TextColumn("[bold]passes[/]"), BarColumn(), TextColumn("{task.description}"),
                 TimeElapsedColumn(), console=console, transient=True)
        if progress else contextlib.nullcontext()
    )
    with bar:
        task = bar.add_task("", total=len(passes)) if progress else None
        for p in passes:
            name = p.name or type(p).__name__
            where = f"pass '{name}'" + (f" (after {', '.join(done)})" if done else " (first pass)")
            if progress:
                bar.update(task, description=name)
            if checkpoint is not None and not checked and not p.exact:
                checked.append(checkpoint(model, list(done)))
            before = fingerprint(model)
            if p.uses_calibration:
                p.calibration = calibration
            if p.uses_source_blocks:
                p.source_blocks = source_blocks
            if p.uses_teacher:
                p.teacher = teacher
            start = time.perf_counter()
            try:
                result = p(model)
            except KilnError as exc:  # one format: "pass 'X' (after ...): <what>"
                message = str(exc)
                for prefix in (f"pass '{name}': ", f"{name}: "):
                    message = message.removeprefix(prefix)
                exc.args = (f"{where}: {message}",)
                raise
            except Exception as exc:
                raise PipelineError(f"{where} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
            seconds = time.perf_counter() - start
            trace_rss(f"pass {name}")
            if not isinstance(result, KilnPassResult):
                raise PipelineError(f"{where} broke the contract: returned {type(result).__name__}, not KilnPassResult")
            if not isinstance(result.modified, bool):
                raise PipelineError(f"{where} broke the contract: 'modified' is not a bool")
            model = result.model
            changed = fingerprint(model) != before
            if changed and calibration is not None:
                calibration = [p.adapt_feeds(f, model) for f in calibration]
            if changed and quality is not None:
                quality.feeds = [p.adapt_feeds(f, model) for f in quality.feeds]
            if changed and not result.modified:
                raise PipelineError(f"{where} broke the contract: reported modified=False but changed the graph")
            try:
                verify(model)
            except VerificationError as exc:
                raise PipelineError(f"{where} produced an invalid model: {exc}") from exc

            record: dict[str, Any] = {
                "name": name,
                "params": p.params,
                "modified": result.modified,
                "stats": result.stats,
                "seconds": round(seconds, 3),
                "exact": p.exact,
                "metric": p.metric,
                "budget": p.budget,
            }
            if result.rejected:
                record["rejected"] = result.rejected
            if result.warnings:
                record["warnings"] = result.warnings
            if previous_outputs is None:
                record["delta"] = None
            elif not result.modified:
                record["delta"] = {"max_abs": 0.0, "max_rel": 0.0}
                record["delta_total"] = records[-1].get("delta_total", record["delta"]) if records else record["delta"]
            else:
                try:
                    sample_inputs = p.adapt_feeds(sample_inputs, model)
                    outputs = run_ort(model, sample_inputs)
                    delta = compare(previous_outputs, outputs)
                    total = compare(source_outputs, outputs)
                except Exception as exc:
                    raise PipelineError(f"{where} produced a model ORT cannot run: {_first_line(exc)}") from exc
                record["delta"], record["delta_total"] = _round(delta), _round(total)
                if p.metric not in delta:  # e.g. KL over a one-column regression output
                    raise PipelineError(f"{where}: its metric '{p.metric}' is not defined for this model's outputs "
                                        f"({', '.join(f'{k} {list(v.shape)}' for k, v in outputs.items())}); "
                                        f"it measures {', '.join(sorted(delta))}")
                value = delta[p.metric]
                if not within_budget(p.metric, value, p.budget) and p.exact:
                    # Rounding-level on a model that amplifies rounding: the budget is a multiple of
                    # the model's own float32 noise instead.
                    noise = record["rounding_noise"] = float(f"{rounding_noise(model, sample_inputs, outputs):.3g}")
                    record["budget"] = max(p.budget, NOISE_MULTIPLE * noise)
                if not within_budget(p.metric, value, record["budget"]):
                    kind = "exact pass changed the outputs" if p.exact else "lossy pass exceeded its budget"
                    floor = f" (= {NOISE_MULTIPLE}x this model's float32 rounding noise)" if record["budget"] != p.budget else ""
                    error = PipelineError if p.exact else BudgetExceeded
                    raise error(f"{where}: {kind}: {p.metric} {value:.3g} vs budget {record['budget']:.3g}{floor}")
                previous_outputs = outputs
                if quality is not None and not p.exact:
                    try:
                        values = quality.measure(model)
                    except Exception as exc:
                        raise PipelineError(f"{where}: the quality check could not run: {_first_line(exc)}") from exc
                    record["quality"] = quality_summary["final"] = values
                    if quality.violated(values):
                        raise BudgetExceeded(f"{where}: {quality.describe(values)}")
            records.append(record)
            trace_rss(f"checks after {name}")
            done.append(name)
            if progress:
                bar.advance(task)
    if checkpoint is not None and not checked:
        checked.append(checkpoint(model, list(done)))
    return PipelineRun(model, records, sample_inputs, quality_summary, checked[0] if checked else None)


def trace_rss(label: str) -> None:
    """With KILN_TRACE_RSS=1 (Linux): print the resident memory now and its peak since the last
    trace to stderr, then reset the peak, so each traced stage reports its own high-water mark."""
    if not os.environ.get("KILN_TRACE_RSS"):
        return
    try:
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        rss, peak = (int(status[k].split()[0]) / 1e6 for k in ("VmRSS", "VmHWM"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM
    except (OSError, KeyError, ValueError):
        return
    print(f"[rss] {label}: {rss:.2f} GB now, peak {peak:.2f} GB", file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

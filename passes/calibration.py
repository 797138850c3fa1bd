"""Activation statistics for data-aware passes (GPTQ, activation-aware SVD, structured pruning).

A pass that sets `uses_calibration = True` gets `self.calibration` from the pipeline before
it runs: a list of feed dicts for the model's *current* signature (real text, tokenized by
the compiler, adapted through signature-changing passes exactly like the sample inputs).

`capture` runs those feeds through ONNX Runtime with chosen intermediate values exposed
as extra graph outputs and yields them one feed at a time; `collect` folds them into
per-channel running statistics (`Stats`) so memory stays at one batch, whatever the
amount of calibration text; `grams` folds them into Gram matrices. `short_feed` and
`refresh_shapes` re-read the annotated shapes after a pass changed an int dim (heads,
channels) from one short ORT run (symbolic dims stay symbolic). Values are flattened to rows over their last axis (rows =
tokens, columns = channels); calibration feeds carry no padding, so every row is real.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from kiln.errors import KilnError
from kiln.ir.values import is_const
from kiln.passes.numerics import ort_session


class CalibrationError(KilnError):
    pass


@dataclasses.dataclass
class Stats:
    """Running statistics of a value's rows (last axis = channels)."""

    rows: int
    abs_sum: np.ndarray  # [K] Σ|x|
    sq_sum: np.ndarray  # [K] Σx², float64
    abs_max: np.ndarray  # [K] max|x|
    gram: np.ndarray | None  # [K, K] Σ xᵀx, float64 (only when asked: K² memory)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)

    @property
    def rms(self) -> np.ndarray:
        return np.sqrt(self.sq_sum / max(self.rows, 1))

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float32)
        self.rows += x.shape[0]
        self.abs_sum += np.abs(x).sum(0)
        self.sq_sum += np.square(x, dtype=np.float64).sum(0)
        np.maximum(self.abs_max, np.abs(x).max(0), out=self.abs_max)
        if self.gram is not None:
            x64 = x.astype(np.float64)
            self.gram += x64.T @ x64

    @classmethod
    def empty(cls, channels: int, gram: bool) -> Stats:
        return cls(0, np.zeros(channels, np.float64), np.zeros(channels, np.float64), np.zeros(channels, np.float32),
                   np.zeros((channels, channels), np.float64) if gram else None)


def require(calibration: Sequence[dict[str, np.ndarray]] | None, who: str) -> Sequence[dict[str, np.ndarray]]:
    if not calibration:
        raise CalibrationError(f"{who} needs calibration data (compile with --calibration TEXTFILE, "
                               "or from a model whose tokenizer kiln knows)")
    return calibration


def capture(model: ir.Model, feeds: Sequence[dict[str, np.ndarray]], values: Sequence[str],
            ) -> Iterator[dict[str, np.ndarray]]:
    """For each feed dict, the arrays of the named intermediate values (and graph outputs)."""
    by_name = {v.name: v for node in model.graph for v in node.outputs}
    by_name.update({v.name: v for v in model.graph.inputs})
    missing = [n for n in values if n not in by_name]
    if missing:
        raise CalibrationError(f"cannot capture '{missing[0]}': no such value in the graph")
    if all(by_name[n].is_graph_input() for n in values):  # nothing to run
        for feed in feeds:
            yield {n: feed[n] for n in values}
        return
    extra = [by_name[n] for n in dict.fromkeys(values) if not by_name[n].is_graph_output()
             and not by_name[n].is_graph_input()]
    graph_outputs = list(model.graph.outputs)
    model.graph.outputs.extend(extra)
    try:
        session = ort_session(model)
    finally:
        model.graph.outputs.clear()
        model.graph.outputs.extend(graph_outputs)
    inputs = {i.name for i in session.get_inputs()}
    wanted = [n for n in dict.fromkeys(values) if n not in inputs]
    for feed in feeds:
        got = dict(zip(wanted, session.run(wanted, {k: v for k, v in feed.items() if k in inputs})))
        got.update({n: feed[n] for n in values if n in inputs})
        yield got


def collect(model: ir.Model, feeds: Sequence[dict[str, np.ndarray]], values: Sequence[str],
            gram: Sequence[str] = ()) -> dict[str, Stats]:
    """Statistics of each named value over all calibration feeds; Σxᵀx for those in `gram`."""
    stats: dict[str, Stats] = {}
    for arrays in capture(model, feeds, values):
        for name, x in arrays.items():
            if name not in stats:
                stats[name] = Stats.empty(x.shape[-1], name in gram)
            stats[name].add(x)
    return stats


# Σ xᵀx of all requested values above this many bytes are not accumulated side by side: the
# captured values go to disk and each Gram matrix is summed when it is asked for (a 0.5B model
# with 4864-wide MLPs would otherwise hold 4.7 GB of float64 Hessians at once).
GRAM_MEMORY = 1 << 30


class Grams:
    """Σ xᵀx (float64) of named values over the calibration feeds, as `collect` sums them.

    Small sets are collected in one pass and held; when their total would exceed
    `GRAM_MEMORY`, the captured arrays are written to a temporary folder in the same pass and
    `grams[name]` sums that value's matrix from them (the same additions in the same order, so
    the same bits); `release(name)` frees one that is no longer needed."""

    def __init__(self, model: ir.Model, feeds: Sequence[dict[str, np.ndarray]], names: Sequence[str],
                 memory: int | None = None):
        self.names = list(dict.fromkeys(names))
        by_name = {v.name: v for node in model.graph for v in node.outputs}
        by_name.update({v.name: v for v in model.graph.inputs})
        widths = [_last_dim(by_name.get(n)) for n in self.names]
        limit = GRAM_MEMORY if memory is None else memory
        self._dir = None
        self._held: dict[str, np.ndarray] = {}
        if all(w is not None for w in widths) and sum(8 * w * w for w in widths) > limit:
            self._dir = tempfile.TemporaryDirectory(prefix="kiln-activations-")
            self._count = 0
            for i, arrays in enumerate(capture(model, feeds, self.names)):
                for j, name in enumerate(self.names):
                    np.save(self._path(j, i), arrays[name])
                self._count = i + 1
        else:
            self._held = {n: s.gram for n, s in collect(model, feeds, self.names, gram=self.names).items()}

    def _path(self, j: int, i: int) -> str:
        return os.path.join(self._dir.name, f"{j}-{i}.npy")

    def __contains__(self, name: str) -> bool:
        return name in self._held or (self._dir is not None and name in self.names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._held:
            if self._dir is None or name not in self.names:
                raise KeyError(name)
            j = self.names.index(name)
            gram = None
            for i in range(self._count):
                x = np.load(self._path(j, i))
                x = x.reshape(-1, x.shape[-1]).astype(np.float32)
                if gram is None:
                    gram = np.zeros((x.shape[1], x.shape[1]), np.float64)
                x64 = x.astype(np.float64)
                gram += x64.T @ x64
            self._held[name] = gram
        return self._held[name]

    def release(self, name: str) -> None:
        """Forget a matrix that can be summed again from disk (held ones stay)."""
        if self._dir is not None:
            self._held.pop(name, None)

    def close(self) -> None:
        self._held = {}
        if self._dir is not None:
            self._dir.cleanup()


def _last_dim(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None or len(value.shape) == 0:
        return None
    last = value.shape[-1]
    return last if isinstance(last, int) else None


@dataclasses.dataclass
class Gram:
    """Σ xᵀx over the rows of a captured value (last axis = channels), and the row count."""

    gram: np.ndarray
    rows: int
    total: np.ndarray | None = None  # Σ x

    @property
    def sq_sum(self) -> np.ndarray:
        return np.diag(self.gram).copy()

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.rows, 1)

    @property
    def covariance(self) -> np.ndarray:
        mu = self.mean
        return self.gram / max(self.rows, 1) - np.outer(mu, mu)


def grams(model: ir.Model, feeds, names: Sequence[str]) -> dict[str, Gram]:
    """Gram matrices of the named values over the calibration feeds: float32 products per
    feed (fast BLAS), accumulated in float64."""
    out: dict[str, Gram] = {}
    for arrays in capture(model, feeds, list(dict.fromkeys(names))):
        for name, x in arrays.items():
            x = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
            g = (x.T @ x).astype(np.float64)
            t = x.sum(0, dtype=np.float64)
            if name in out:
                out[name].gram += g
                out[name].rows += x.shape[0]
                out[name].total += t
            else:
                out[name] = Gram(g, x.shape[0], t)
    return out


def short_feed(calibration: Sequence[dict[str, np.ndarray]] | None, model: ir.Model, tokens: int = 8) -> dict:
    """A small feed for shape probing: the first `tokens` of the first calibration feed (or ones)."""
    if calibration:
        return {k: (v[:, :tokens] if v.ndim == 2 else v) for k, v in calibration[0].items()}
    feed = {}
    for v in model.graph.inputs:
        shape = [d if isinstance(d, int) else (1 if i == 0 else tokens) for i, d in enumerate(v.shape)]
        feed[v.name] = np.ones(shape, dtype=v.dtype.numpy())
    return feed


def refresh_shapes(model: ir.Model, feed: dict[str, np.ndarray], values: Iterable[ir.Value] | None = None) -> int:
    """Re-annotate int dims of intermediate values from one ORT run on `feed`; symbolic dims stay.

    Returns the number of values whose annotation changed. Values of unknown rank stay as they are.
    """
    graph = model.graph
    targets = list(values) if values is not None else [o for n in graph for o in n.outputs]
    targets = [v for v in targets if v.shape is not None and v.dtype is not None and not v.is_graph_output()
               and any(isinstance(d, int) for d in v.shape) and v.producer() is not None
               and v.producer().op_type != "Constant" and not all(is_const(i) for i in v.producer().inputs if i is not None)]
    if not targets:
        return 0
    saved = {v: v.shape for v in targets}
    for v in targets:
        v.shape = None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    outputs = list(graph.outputs)
    graph.outputs.extend(targets)
    try:
        session = ort_session(model, opts)
    finally:
        graph.outputs.clear()
        graph.outputs.extend(outputs)
        for v, s in saved.items():
            v.shape = s
    names = [v.name for v in targets]
    inputs = {i.name for i in session.get_inputs()}
    arrays = session.run(names, {k: v for k, v in feed.items() if k in inputs})
    changed = 0
    for v, a in zip(targets, arrays):
        old = list(v.shape)
        if len(old) != a.ndim:
            continue
        new = [a.shape[i] if isinstance(d, int) else d for i, d in enumerate(old)]
        if new != old:
            v.shape = ir.Shape(new)
            changed += 1
    return changed

"""Quality budgets checked inside the pipeline, so the pass that spends one is named.

`QualityBudget` holds feed dicts of held-out text (adapted through signature-changing
passes like the sample inputs) and a limit on one metric:

- `ppl_increase` (causal LMs): perplexity of the next-token predictions over the feeds'
  tokens, relative to the source model: PPL / PPL_source - 1 must stay <= limit;
- `cosine` (encoders): mean cosine similarity of every output row (e.g. pooled
  embeddings) to the source model's must stay >= limit (the minimum is reported too).

The pipeline measures the source once, then the model after every lossy pass that changed
it (exact passes are held to 1e-4 already), records the value, and stops at the first
pass that takes the model over the limit.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from kiln.passes.numerics import log_softmax, ort_session

METRICS = ("ppl_increase", "cosine")


def budget_problem(max_ppl_increase: float | None, min_cosine: float | None) -> str | None:
    """What is wrong with the budgets a user gave (`kiln compile`, `kiln search`), or None."""
    if max_ppl_increase is not None and min_cosine is not None:
        return "give one quality budget: --max-ppl-increase (LLMs) or --min-cosine (encoders)"
    if max_ppl_increase is not None and not max_ppl_increase >= 0:
        return f"--max-ppl-increase must be a fraction >= 0 (e.g. 0.05 or 5%), not {max_ppl_increase}"
    if min_cosine is not None and not -1 <= min_cosine <= 1:
        return f"--min-cosine must lie in [-1, 1], not {min_cosine}"
    return None


@dataclasses.dataclass
class QualityBudget:
    metric: str
    limit: float
    feeds: list[dict[str, np.ndarray]]
    baseline: dict | None = None  # set by `measure` on the source model

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"quality metric must be one of {', '.join(METRICS)}")
        if not self.feeds:
            raise ValueError("a quality budget needs at least one feed")

    def measure(self, model: ir.Model) -> dict[str, float]:
        """Metric values for `model`; the first call (the source) sets the baseline."""
        session = ort_session(model)
        output = session.get_outputs()[0].name
        inputs = {i.name for i in session.get_inputs()}
        outputs = [session.run([output], {k: v for k, v in f.items() if k in inputs})[0] for f in self.feeds]
        if self.metric == "ppl_increase":
            nll, count = 0.0, 0
            for feed, logits in zip(self.feeds, outputs):
                ids = feed["input_ids"]
                lp = log_softmax(logits[:, :-1])
                nll -= float(np.take_along_axis(lp, ids[:, 1:, None], axis=-1).sum())
                count += ids[:, 1:].size
            ppl = math.exp(nll / count)
            if self.baseline is None:
                self.baseline = {"ppl": ppl}
            return {"ppl": round(ppl, 4), "ppl_increase": round(ppl / self.baseline["ppl"] - 1, 5)}
        rows = [o.reshape(-1, o.shape[-1]).astype(np.float64) for o in outputs]
        if self.baseline is None:
            self.baseline = {"rows": rows}
        ref = np.concatenate(self.baseline["rows"])
        new = np.concatenate(rows)
        cos = np.sum(ref * new, 1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(new, axis=1), 1e-30)
        return {"cosine": round(float(cos.mean()), 6), "cosine_min": round(float(cos.min()), 6)}

    def violated(self, values: dict[str, float]) -> bool:
        value = values[self.metric]
        return value > self.limit if self.metric == "ppl_increase" else value < self.limit

    def describe(self, values: dict[str, float]) -> str:
        if self.metric == "ppl_increase":
            return (f"perplexity +{values['ppl_increase']:.2%} ({self.baseline['ppl']:.2f} -> {values['ppl']:.2f}) "
                    f"exceeds --max-ppl-increase {self.limit:.2%}")
        return f"mean cosine {values['cosine']:.5f} is below --min-cosine {self.limit:g}"


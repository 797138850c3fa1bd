"""The base of the structural passes (drop-layers, prune-heads, prune-mlp, factorize-low-rank):
lossy, calibrated passes that remove parameters toward an amount.

The amount is either a whole-model target, `target_params` (the fraction of the model's
parameters to keep, embeddings included, a tied table counted once) or `target_mb` (megabytes
of weights at the model's current bytes per parameter), or one amount of the pass's own
(ratio, energy, rank, layers, drop). `StructuralPass.__init__` validates the target, that at
most one amount is given and the quality metric; `keep` converts a target to a parameter count.
`refit_rows` refits the rows of a projection after some of its input channels were removed.

`retarget_steps` applies `kiln compile --target-params/--target-size` to a recipe, and
`parse_size_mb` reads the sizes the CLI takes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.errors import KilnError
from kiln.ir.values import param_count
from kiln.passes.base import KilnPass, KilnPassResult
from kiln.passes.registry import get_pass

METRICS = ("kl", "cosine", "max_rel", "max_abs", "top1")
AMOUNT_KNOBS = ("target_params", "target_mb", "ratio", "energy", "rank", "layers", "drop")


class StructuralPass(KilnPass):
    exact = False
    uses_calibration = True

    def __init__(self, target_params: float, target_mb: float, metric: str, budget: float,
                 amounts: dict[str, object], required: bool = False):
        """`amounts`: the pass's own amount knobs by name; `required`: one amount must be given."""
        super().__init__()
        if not 0 <= target_params <= 1:
            raise ValueError(f"target_params must be in (0, 1] (the fraction of parameters to keep), got {target_params}")
        if target_mb < 0:
            raise ValueError(f"target_mb must be > 0, got {target_mb}")
        given = sum(bool(v) for v in amounts.values()) + bool(target_params) + bool(target_mb)
        if given > 1 or (required and not given):
            which = "exactly one" if required else "at most one"
            raise ValueError(f"give {which} of target_params, target_mb, {', '.join(amounts)}")
        check_metric(metric)
        self.target_params, self.target_mb, self.metric, self.budget = target_params, target_mb, metric, budget

    def nothing_to_do(self, model: ir.Model, found: list, rejected: list[str], what: str,
                      stats: dict) -> KilnPassResult | None:
        """The unchanged result when there is nothing to cut: no `what` found, or no amount given
        (`ratio` 0 and no target); None when the pass has work to do."""
        if not found:
            return self.result(model, modified=False, stats=stats, rejected=rejected or [f"no {what} found"])
        if not getattr(self, "ratio", 0) and self.keep(model) is None:
            return self.result(model, modified=False, stats=stats, rejected=["nothing to prune (ratio=0, no target)"])
        return None

    def keep(self, model: ir.Model) -> int | None:
        """The parameter count the target asks for (None without a target): `target_params` ×
        the model's parameters, or `target_mb` of weights at the model's current mean bytes per
        parameter (for an fp32 model: 4)."""
        total = param_count(model)
        if self.target_params:
            return round(self.target_params * total)
        if self.target_mb:
            nbytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
            return int(self.target_mb * 1e6 / (nbytes / max(total, 1)))
        return None


def refit_rows(gram: np.ndarray, rows: int, keep: np.ndarray, w: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """argmin_W' ‖h[:, keep] W' − h W‖² + λ‖W'‖² from G = hᵀh."""
    g = gram / max(rows, 1)
    gkk = g[np.ix_(keep, keep)]
    lam = ridge * float(np.mean(np.diag(gkk))) + 1e-12
    rhs = g[keep] @ w.astype(np.float64)
    return np.linalg.solve(gkk + lam * np.eye(len(keep)), rhs).astype(np.float32)


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got '{metric}'")


def retarget_steps(steps: list[tuple[str, dict]], target_params: float | None = None,
                   target_mb: float | None = None) -> list[tuple[str, dict]]:
    """A recipe's steps with a whole-model target (`kiln compile --target-params/--target-size`)
    given to its structural pass, replacing that pass's own amount (ratio, energy, rank, ...).

    The recipe must hold exactly one pass that takes `target_params` (each pass's target is
    relative to the model it sees, so two would compound)."""
    if target_params is None and target_mb is None:
        return steps
    if target_params is not None and not 0 < target_params <= 1:
        raise KilnError(f"--target-params must be in (0, 1] (the fraction of parameters to keep), got {target_params}")
    if target_mb is not None and target_mb <= 0:
        raise KilnError(f"--target-size must be > 0, got {target_mb} MB")
    if target_params is not None and target_mb is not None:
        raise KilnError("give --target-params or --target-size, not both")
    takes = [i for i, (name, _) in enumerate(steps) if "target_params" in get_pass(name).parameter_names()]
    if len(takes) != 1:
        which = ", ".join(steps[i][0] for i in takes) or "none"
        raise KilnError(f"--target-params/--target-size need a recipe with exactly one structural pass "
                        f"(this one has: {which}); set targets per pass in the recipe instead")
    out = [(name, dict(params)) for name, params in steps]
    _name, params = out[takes[0]]
    for knob in AMOUNT_KNOBS:
        params.pop(knob, None)
    params["target_params" if target_params is not None else "target_mb"] = (
        target_params if target_params is not None else target_mb)
    return out


def parse_size_mb(text: str) -> float:
    """'60MB' / '60 MB' / '0.5GB' / '60' (MB) -> megabytes."""
    t = text.strip().upper().replace(" ", "")
    for suffix, scale in (("GB", 1000.0), ("MB", 1.0), ("KB", 1e-3), ("G", 1000.0), ("M", 1.0)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * scale
    return float(t)

"""Structured pruning of MLP intermediate channels, scored on calibration activations.

    h[.., I] = φ(X·W_up1[D, I] (+ b1), X·W_up2[D, I] (+ b2), ...)     (channel-wise: gate/up of a
    Y = h · W_down[I, D']                                                  gated MLP, or fc1 + GELU)
  ->
    the same with I' < I: columns of every up projection (and their biases and any other [I]
    constant of the channel-wise region) and rows of W_down removed together.

Found structurally: a MatMul with a constant weight whose input is computed from one or more
constant-weight MatMuls of width I through elementwise ops only (`kiln.passes.analysis.mlps.find_mlps`);
no names, no per-architecture code. Removing channel j is exactly zeroing row j of W_down.

Importance of channel j: its share of the down projection's output energy on calibration text,
E[h_j²]·‖W_down[j, :]‖². With `refit=true` (default) the kept rows of W_down are refitted by
least squares on the calibration activations (min ‖h_keep W' − h W‖², a small ridge), which
recovers much of what the removed channels carried.

How much: `ratio=f` removes a fraction f of the channels of every MLP; `target_params=p` (or
`target_mb`) removes channels until the model has p × its parameters (embeddings included),
uniformly over the MLPs (`allocation="uniform"`) or where the normalised importance is lowest
(`allocation="global"`, at least `channel_multiple` channels stay in each MLP). Widths are
multiples of `channel_multiple`.

Lossy (metric KL by default). Stats: params_before/after/removed, MLPs pruned, widths. Not handled:
MLPs whose intermediate values are read elsewhere, MoE routers, packed gate/up (run pack-matmuls after).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.errors import KilnError
from kiln.ir.values import const_array, param_count, remove_unused_initializers, set_const_input
from kiln.passes.analysis.linear import weight_of
from kiln.passes.analysis.mlps import MLP, find_mlps
from kiln.passes.calibration import collect, grams, require
from kiln.passes.registry import register_pass
from kiln.passes.structural import StructuralPass, refit_rows


def _channel_cost(mlp: MLP) -> int:
    up = sum(weight_of(n).shape[0] for n in mlp.ups)
    return up + weight_of(mlp.down).shape[1] + len(mlp.channel_consts)


@register_pass("prune-mlp")
class PruneMLPPass(StructuralPass):
    def __init__(self, target_params: float = 0.0, target_mb: float = 0.0, ratio: float = 0.0,
                 allocation: str = "uniform", refit: bool = True, channel_multiple: int = 8,
                 metric: str = "kl", budget: float = 1.0):
        super().__init__(target_params, target_mb, metric, budget, {"ratio": ratio})
        if not 0 <= ratio < 1:
            raise ValueError(f"ratio must be in [0, 1) (the fraction of channels removed), got {ratio}")
        if allocation not in ("uniform", "global"):
            raise ValueError(f"allocation must be 'uniform' or 'global', got '{allocation}'")
        if channel_multiple < 1:
            raise ValueError("channel_multiple must be >= 1")
        self.ratio, self.allocation, self.refit, self.channel_multiple = ratio, allocation, refit, channel_multiple

    def call(self, model: ir.Model):
        before = param_count(model)
        mlps, rejected = find_mlps(model)
        base = {"params_before": before, "params_after": before, "params_removed": 0, "mlps_seen": len(mlps)}
        if (unchanged := self.nothing_to_do(model, mlps, rejected, "MLP", base)) is not None:
            return unchanged
        keep_total = self.keep(model)
        feeds = require(self.calibration, "prune-mlp")
        names = [m.inter.name for m in mlps]
        stats = grams(model, feeds, names) if self.refit else collect(model, feeds, names)
        scores = [stats[m.inter.name].sq_sum * np.square(weight_of(m.down).astype(np.float64)).sum(1) for m in mlps]
        costs = [_channel_cost(m) for m in mlps]
        if self.ratio:
            removes = [self._round(self.ratio * m.width) for m in mlps]
        else:
            removes = self._plan(mlps, scores, costs, before - keep_total)
        pruned, widths = 0, []
        for m, score, n_remove in zip(mlps, scores, removes):
            n_remove = min(n_remove, m.width - self.channel_multiple)
            if n_remove <= 0:
                widths.append(m.width)
                continue
            keep = np.sort(np.argsort(score, kind="stable")[n_remove:])
            self._prune(model.graph, m, keep, stats[m.inter.name] if self.refit else None)
            pruned += 1
            widths.append(len(keep))
        if pruned:
            remove_unused_initializers(model)
        after = param_count(model)
        out = {**base, "params_after": after, "params_removed": before - after, "fraction_kept": round(after / before, 4),
               "mlps_pruned": pruned, "width_before": mlps[0].width, "width_min": min(widths), "width_max": max(widths),
               "refit": int(bool(self.refit))}
        return self.result(model, modified=pruned > 0, stats=out, rejected=rejected)

    def _round(self, n: float) -> int:
        m = self.channel_multiple
        return round(n / m) * m

    def _plan(self, mlps: list[MLP], scores, costs, to_remove: int) -> list[int]:
        if to_remove <= 0:
            return [0] * len(mlps)
        capacity = sum((m.width - self.channel_multiple) * c for m, c in zip(mlps, costs))
        if capacity < to_remove:
            raise KilnError(f"prune-mlp: cannot remove {to_remove:,} parameters: the MLPs hold {capacity:,} "
                            f"removable (keeping {self.channel_multiple} channels each)")
        if self.allocation == "uniform":
            frac = to_remove / sum(m.width * c for m, c in zip(mlps, costs))
            m_ = self.channel_multiple
            return [int(np.ceil(frac * m.width / m_)) * m_ for m in mlps]
        # global: cheapest normalised importance first
        entries = []
        for i, (m, s) in enumerate(zip(mlps, scores)):
            norm = s / max(float(s.sum()), 1e-300)
            order = np.sort(norm)[: m.width - self.channel_multiple]
            entries += [(float(v), i) for v in order]
        entries.sort()
        counts, removed = [0] * len(mlps), 0
        for _, i in entries:
            if removed >= to_remove:
                break
            counts[i] += 1
            removed += costs[i]
        return [int(np.ceil(c / self.channel_multiple)) * self.channel_multiple for c in counts]

    @staticmethod
    def _prune(graph: ir.Graph, m: MLP, keep: np.ndarray, stats) -> None:
        for up in m.ups:
            set_const_input(graph, up, 1, weight_of(up)[:, keep], ".pruned")
        for node, idx in m.channel_consts:
            c = const_array(node.inputs[idx])
            set_const_input(graph, node, idx, c.reshape(-1)[keep].reshape(*c.shape[:-1], len(keep)), ".pruned")
        w = weight_of(m.down)
        new_w = refit_rows(stats.gram, stats.rows, keep, w) if stats is not None else w[keep]
        set_const_input(graph, m.down, 1, new_w, ".pruned")
        width = len(keep)
        for node in [*m.ups, *m.region]:
            for o in node.outputs:
                if o.shape is not None and len(o.shape) and o.shape[-1] == m.width:
                    o.shape = ir.Shape([*list(o.shape)[:-1], width])

"""Drop whole decoder layers, chosen by block influence on calibration text (ShortGPT).

    x_{i+1} = layer_i(x_i)   ->   x_{i+1} = x_i        for each dropped layer i

Layers are found on the residual stream (`kiln.passes.analysis.layers.decoder_layers`): the residual
Adds `skip + f(skip)` in graph order, a layer starting at each sublayer that contains a Softmax
attention. A layer's input is the stream value entering its first sublayer, its output the
value entering the next layer (pre-norm: the last residual Add; post-norm: the norm after it).
Dropping a layer rewires every reader of its output to its input; its nodes and weights become
dead and are removed. A KV cache inserted afterwards has one layer fewer per dropped layer
(the manifest's `kv_cache.num_layers`).

Block influence of layer i: BI_i = 1 − E_tokens[cos(x_i, x_{i+1})], measured on the calibration
feeds; the layers with the lowest BI change the hidden state least and go first.

How many: `layers=n` drops n layers, `drop=[i, ...]` exactly those (0-based), or
`target_params=p` (or `target_mb`) as few layers as reach p × the model's parameters (embeddings
included). Lossy (metric KL by default). Stats: layers_before/after, params_before/after/removed,
the dropped layers and their BI. Not handled: a post-norm model's last layer (its output is not
on the stream), parallel attention/MLP blocks, models without residual Adds.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.errors import KilnError
from kiln.ir import kv_layout
from kiln.ir.values import param_count, remove_unused_initializers
from kiln.passes.analysis.layers import Layer, decoder_layers, exclusive_params
from kiln.passes.calibration import capture, require
from kiln.passes.registry import register_pass
from kiln.passes.structural import StructuralPass


def block_influence(model: ir.Model, layers: list[Layer], feeds) -> list[float]:
    names = list(dict.fromkeys(v.name for layer in layers for v in (layer.start, layer.end) if v is not None))
    sums = np.zeros(len(layers))
    count = 0
    for arrays in capture(model, feeds, names):
        for i, layer in enumerate(layers):
            if layer.end is None:
                continue
            a = arrays[layer.start.name].reshape(-1, arrays[layer.start.name].shape[-1]).astype(np.float64)
            b = arrays[layer.end.name].reshape(-1, a.shape[-1]).astype(np.float64)
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
            sums[i] += float(cos.sum())
        first = arrays[layers[0].start.name]
        count += first.size // first.shape[-1]
    return [float(1 - s / max(count, 1)) if layer.end is not None else float("inf") for s, layer in zip(sums, layers)]


@register_pass("drop-layers")
class DropLayersPass(StructuralPass):
    def __init__(self, target_params: float = 0.0, target_mb: float = 0.0, layers: int = 0, drop: list | None = None,
                 metric: str = "kl", budget: float = 1.0):
        drop = list(drop or [])
        super().__init__(target_params, target_mb, metric, budget, {"layers": layers, "drop": drop})
        if layers < 0 or any(not isinstance(i, int) or i < 0 for i in drop):
            raise ValueError("layers must be >= 0 and drop a list of layer indices >= 0")
        self.layers, self.drop = layers, drop

    def call(self, model: ir.Model):
        if kv_layout(model) is not None:
            raise KilnError("drop-layers: the model already has a KV cache; put this pass before insert-kv-cache "
                            "(the cache's layers and heads follow the pruned model)")
        before = param_count(model)
        found = decoder_layers(model)
        base = {"params_before": before, "params_after": before, "params_removed": 0, "layers_before": len(found),
                "layers_after": len(found)}
        if not found:
            return self.result(model, modified=False, stats=base, rejected=["no residual layers found"])
        candidates = [i for i, layer in enumerate(found) if layer.end is not None and not layer.end.is_graph_output()]
        costs = {i: exclusive_params(model, found[i].nodes) for i in candidates}
        if self.drop:
            bad = [i for i in self.drop if i not in candidates]
            if bad:
                raise KilnError(f"drop-layers: layer {bad[0]} cannot be dropped (the model has {len(found)} layers; "
                                f"droppable: {candidates})")
            chosen, bi = list(self.drop), None
        else:
            keep = self.keep(model)
            if not self.layers and keep is None:
                return self.result(model, modified=False, stats=base, rejected=["nothing to drop (no target)"])
            feeds = require(self.calibration, "drop-layers")
            bi = block_influence(model, found, feeds)
            order = sorted(candidates, key=lambda i: bi[i])
            if self.layers:
                if self.layers > len(candidates):
                    raise KilnError(f"drop-layers: cannot drop {self.layers} of {len(candidates)} droppable layers")
                chosen = order[: self.layers]
            else:
                chosen, removed = [], 0
                for i in order:
                    if before - removed <= keep:
                        break
                    chosen.append(i)
                    removed += costs[i]
                if before - removed > keep:
                    raise KilnError(f"drop-layers: cannot reach {keep:,} parameters by dropping layers")
        for i in sorted(chosen, reverse=True):
            layer = found[i]
            layer.end.replace_all_uses_with(layer.start)
        if chosen:
            remove_unused_initializers(model)
        after = param_count(model)
        stats = {**base, "params_after": after, "params_removed": before - after, "fraction_kept": round(after / before, 4),
                 "layers_after": len(found) - len(chosen), "dropped": ",".join(map(str, sorted(chosen)))}
        if bi is not None:
            stats["block_influence_dropped"] = ",".join(f"{bi[i]:.4f}" for i in sorted(chosen))
            stats["block_influence_min_kept"] = round(min((bi[i] for i in candidates if i not in chosen), default=0.0), 4)
        return self.result(model, modified=bool(chosen), stats=stats)

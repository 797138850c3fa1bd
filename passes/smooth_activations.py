"""SmoothQuant: move activation outliers into the weights before int8 quantization.

    X = LayerNormalization(x, γ, β)  |  X = Mul(x̂, γ)  |  X = Add(Mul(x̂, γ), β)      (X [..., K])
    Y_j = MatMul(X, W_j[K, N_j])     for every reader j of X
  ->
    same with γ/s, β/s and W_j' = diag(s)·W_j,   s_k = max|X_k|^α / max_j max_n |W_j[k, n]|^(1-α)

Dynamic int8 quantization gives the whole activation tensor one scale, so a few channels
with large values (common after norms) cost every other channel its precision. Dividing
those channels by s and multiplying the matching weight rows by s leaves the product
unchanged in exact arithmetic (Xiao et al., 2022) and evens out the activation ranges; α
trades activation range against weight range. max|X_k| comes from calibration text.

Where only MatMuls with constant 2-D weights read X, 1/s folds into what made X, for free:
  - a norm with constant per-channel γ (and β): γ/s, β/s (pre-norm decoders: Q/K/V, gate/up
    share one s);
  - a gated product X = Mul(a, b) with b a slice of a MatMul with constant weights, read by
    nothing else (SwiGLU's up projection, packed with gate or not): b's weight columns / s.
Elsewhere (post-norm encoders, whose norm output is also the residual; attention outputs) the
MatMuls read X through an inserted Mul(X, 1/s), one op per site per call; `runtime_scales=False`
leaves those sites unsmoothed instead.
Exact in fp32 (a reparametrization; the pipeline holds it to 1e-4).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kiln.ir.values import new_initializer
from kiln.passes import calibration as calib
from kiln.passes.base import KilnPass
from kiln.passes.registry import register_pass


def _norm_scales(x: ir.Value) -> list[tuple[ir.Node, int]] | None:
    """(node, input index) of the γ (and β) constants that scale X per channel, or None."""
    node = x.producer()
    if node is None:
        return None

    def const_vector(v):
        return v is not None and v.const_value is not None and len(v.const_value.shape) == 1

    if node.op_type in ("LayerNormalization", "SimplifiedLayerNormalization") and const_vector(node.inputs[1]):
        if node.attributes.get_int("axis", -1) != -1 or len(node.outputs) > 1 and node.outputs[1].uses():
            return None
        slots = [(node, 1)]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if not const_vector(node.inputs[2]):
                return None
            slots.append((node, 2))
        return slots
    if node.op_type == "Add":
        mul = next((v.producer() for v in node.inputs if v is not None and v.producer() is not None
                    and v.producer().op_type == "Mul"), None)
        beta = [i for i, v in enumerate(node.inputs) if const_vector(v)]
        if mul is None or len(beta) != 1 or len(list(mul.outputs[0].uses())) != 1:
            return None
        gamma = [i for i, v in enumerate(mul.inputs) if const_vector(v)]
        return [(mul, gamma[0]), (node, beta[0])] if len(gamma) == 1 else None
    if node.op_type == "Mul":
        gamma = [i for i, v in enumerate(node.inputs) if const_vector(v)]
        return [(node, gamma[0])] if len(gamma) == 1 else None
    return None


def _gate_columns(x: ir.Value) -> tuple[ir.Node, int] | None:
    """(MatMul, first column) of the weight columns that produce one factor of X = Mul(a, b),
    where that factor is a MatMul's output or a slice of it along the last axis, read only here."""
    node = x.producer()
    if node is None or node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or x.shape is None:
        return None
    width = x.shape[-1]
    for b in node.inputs:
        if b is None or b.shape is None or b.shape[-1] != width or len(list(b.uses())) != 1 or b.is_graph_output():
            continue
        producer, start = b.producer(), 0
        if producer is not None and producer.op_type == "Split" and len(producer.inputs) > 1:
            sizes = producer.inputs[1].const_value if producer.inputs[1] is not None else None
            rank = len(b.shape)
            if sizes is None or producer.attributes.get_int("axis", 0) not in (-1, rank - 1):
                continue
            start = int(sum(sizes.numpy()[:b.index()]))
            if len(list(producer.inputs[0].uses())) != 1:
                continue
            producer = producer.inputs[0].producer()
        if producer is None or producer.op_type != "MatMul" or producer.domain not in ("", "ai.onnx"):
            continue
        w = producer.inputs[1]
        if w.const_value is None or len(w.shape or ()) != 2 or len(list(w.uses())) != 1:
            continue
        return producer, start
    return None


@register_pass("smooth-activations")
class SmoothActivationsPass(KilnPass):
    uses_calibration = True

    def __init__(self, alpha: float = 0.5, runtime_scales: bool = True):
        super().__init__()
        if not 0 <= alpha <= 1:
            raise ValueError("alpha must be in [0, 1]")
        self.alpha = alpha
        self.runtime_scales = runtime_scales

    def call(self, model: ir.Model):
        sites = []
        for node in list(model.graph):
            for x in node.outputs:
                readers = [(u.node, u.idx) for u in x.uses() if u.node.op_type == "MatMul" and u.idx == 0
                           and u.node.inputs[1].const_value is not None and len(u.node.inputs[1].shape or ()) == 2]
                if not readers:
                    continue
                others = len(list(x.uses())) - len(readers)
                fold = None if others else (_norm_scales(x) or _gate_columns(x))
                if fold is not None or self.runtime_scales:
                    sites.append((x, fold, readers))
        if not sites:
            return self.result(model, modified=False, stats={"sites": 0})
        feeds = calib.require(self.calibration, "smooth-activations")
        stats = calib.collect(model, feeds, [x.name for x, _, _ in sites])
        spread_before, spread_after, folded, gated = [], [], 0, 0
        for x, slots, readers in sites:
            act = np.maximum(stats[x.name].abs_max.astype(np.float64), 1e-5)
            w_max = np.max([np.abs(r.inputs[1].const_value.numpy()).max(axis=1) for r, _ in readers], axis=0)
            s = act ** self.alpha / np.maximum(w_max.astype(np.float64), 1e-5) ** (1 - self.alpha)
            s = np.clip(s, 1e-5, None)
            spread_before.append(act.max() / np.median(act))
            spread_after.append((act / s).max() / np.median(act / s))
            if isinstance(slots, list):  # fold 1/s into the norm's γ and β
                folded += 1
                for node, index in slots:
                    value = node.inputs[index]
                    new = (value.const_value.numpy().astype(np.float64) / s).astype(np.float32)
                    node.replace_input_with(index, new_initializer(model.graph, f"{value.name}.smoothed", new))
            elif slots is not None:  # fold 1/s into the weight columns that make the gated factor
                gated += 1
                matmul, start = slots
                w = matmul.inputs[1]
                new = w.const_value.numpy().astype(np.float64)
                new[:, start:start + len(s)] /= s
                matmul.replace_input_with(1, new_initializer(model.graph, f"{w.name}.smoothed", new.astype(np.float32)))
            else:  # X has other readers or no norm to fold into: scale the MatMuls' copy at run time
                inv = new_initializer(model.graph, f"{x.name}.smooth_scale", (1 / s).astype(np.float32))
                mul = ir.node("Mul", [x, inv], num_outputs=1)
                mul.outputs[0].dtype, mul.outputs[0].shape = x.dtype, x.shape
                mul.outputs[0].name = f"{x.name}.smoothed"
                model.graph.insert_after(x.producer(), mul) if x.producer() else model.graph.insert_before(
                    next(iter(model.graph)), mul)
                for reader, index in readers:
                    reader.replace_input_with(index, mul.outputs[0])
            for reader, _ in readers:
                w = reader.inputs[1]
                new = (w.const_value.numpy().astype(np.float64) * s[:, None]).astype(np.float32)
                reader.replace_input_with(1, new_initializer(model.graph, f"{w.name}.smoothed", new))
        RemoveUnusedNodesPass()(model)
        return self.result(model, modified=True, stats={
            "sites": len(sites), "folded_into_norms": folded, "folded_into_gates": gated,
            "runtime_scales": len(sites) - folded - gated,
            "matmuls": sum(len(r) for _, _, r in sites),
            "activation_outlier_ratio_before": round(float(np.mean(spread_before)), 2),
            "activation_outlier_ratio_after": round(float(np.mean(spread_after)), 2)})

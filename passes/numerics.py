"""Numeric checks between pipeline stages.

Outputs are compared on fixed sample inputs, run through ONNX Runtime's CPU provider
with graph optimizations disabled (so kiln's graph is measured as written).

Metrics (all computed per output, then the worst output is kept):
- max_abs: max |new - ref|
- max_rel: max |new - ref| / max |ref|  (scale-relative; element-wise rtol is meaningless
           for logits near zero). Exact passes must keep this <= 1e-4.
- kl:      mean over positions of KL(softmax(ref) || softmax(new)) on the last axis
- top1:    fraction of positions whose argmax over the last axis is unchanged
- cosine:  min over rows of cosine(ref, new), rows = all axes but the last
Higher-is-better metrics (top1, cosine) have a budget that is a floor; the others a ceiling.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from kiln.ir.io import _NUMPY_DTYPES, IN_MEMORY, without_weights

HIGHER_IS_BETTER = {"top1", "cosine"}


def ort_session(model: ir.Model, opts: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A CPU session over `model`: the proto goes without its large weights, which ORT takes as
    OrtValues over the arrays already in memory instead of through a serialized copy. Without
    `opts`, default options that log errors only."""
    proto, weights = without_weights(model)
    if opts is None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
    values = [ort.OrtValue.ortvalue_from_numpy(np.require(a, requirements="C")) for a in weights.values()]
    if values:
        opts.add_external_initializers(list(weights), values)
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    session.kiln_weights = values  # ORT reads them in place: they live as long as the session
    return session


def run_ort(model: ir.Model, feeds: dict[str, np.ndarray], threads: int = 0) -> dict[str, np.ndarray]:
    """The graph's outputs as ORT runs it with basic optimizations only: constant folding and
    other exact clean-ups, which every ORT binding runs by default (and which MatMulNBits with
    int8 activations needs to read compact scales right), but none of ORT's own fusions."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    session = ort_session(model, opts)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def rounding_noise(model: ir.Model, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> float:
    """How far float32 rounding alone moves this model's outputs: max_rel between `outputs` and
    a run with every float weight moved by one unit in the last place (random direction).

    An exact pass only reorders float arithmetic (a fused kernel sums in another order), so it
    moves the outputs by about this much; a deep or damaged network (e.g. heavily pruned)
    amplifies rounding far more than a healthy one, and a fixed tolerance would reject exact
    rewrites of it."""
    import onnx

    proto = ir.to_proto(model)
    rng = np.random.default_rng(0)
    for init in proto.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        w = onnx.numpy_helper.to_array(init)
        toward = np.where(rng.random(w.shape) < 0.5, -np.inf, np.inf).astype(np.float32)  # float32: one float32 ulp
        moved = np.nextafter(w, toward)
        init.CopyFrom(onnx.numpy_helper.from_array(moved, init.name))
    return compare(outputs, run_ort(ir.from_proto(proto), feeds))["max_rel"]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _metrics_one(ref: np.ndarray, new: np.ndarray) -> dict[str, float]:
    if ref.shape != new.shape:
        raise ValueError(f"output shape changed from {ref.shape} to {new.shape}")
    if not np.issubdtype(ref.dtype, np.floating):
        same = float(np.mean(ref == new)) if ref.size else 1.0
        return {"max_abs": float(np.max(np.abs(ref.astype(np.int64) - new.astype(np.int64)))) if ref.size else 0.0,
                "max_rel": 0.0 if same == 1.0 else 1.0}
    ref64, new64 = ref.astype(np.float64), new.astype(np.float64)
    diff = np.abs(ref64 - new64)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref64).max()) if ref.size else 0.0
    out = {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs}
    if ref.ndim >= 1 and ref.shape[-1] > 1:
        rows_ref = ref64.reshape(-1, ref.shape[-1])
        rows_new = new64.reshape(-1, ref.shape[-1])
        norms = np.linalg.norm(rows_ref, axis=1) * np.linalg.norm(rows_new, axis=1)
        cos = np.sum(rows_ref * rows_new, axis=1) / np.maximum(norms, 1e-30)
        out["cosine"] = float(cos.min())
        out["top1"] = float(np.mean(rows_ref.argmax(1) == rows_new.argmax(1)))
        p, q = _softmax(rows_ref), _softmax(rows_new)
        out["kl"] = float(np.mean(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30)), axis=1)))
    return out


def compare(ref: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> dict[str, float]:
    """Worst value of every metric across outputs (matched by name)."""
    missing = sorted(set(ref) - set(new))
    if missing:
        raise ValueError(f"output '{missing[0]}' disappeared")
    worst: dict[str, float] = {}
    for name in ref:
        for metric, value in _metrics_one(ref[name], new[name]).items():
            if metric not in worst:
                worst[metric] = value
            elif metric in HIGHER_IS_BETTER:
                worst[metric] = min(worst[metric], value)
            else:
                worst[metric] = max(worst[metric], value)
    return worst


def within_budget(metric: str, value: float, budget: float) -> bool:
    return value >= budget if metric in HIGHER_IS_BETTER else value <= budget


def evaluate_subgraph(model: ir.Model, feeds: dict[ir.Value, np.ndarray], outputs: list[ir.Value]) -> list[np.ndarray]:
    """Run only the nodes that compute `outputs` from `feeds` (and constants) with ORT.

    Raises ValueError if an output depends on a graph input that is not fed.
    """
    import onnx

    needed: list[ir.Node] = []
    seen: set[ir.Node] = set()
    initializers: dict[str, ir.Value] = {}
    stack = list(outputs)
    while stack:
        value = stack.pop()
        if value in feeds:
            continue
        producer = value.producer()
        if producer is None:
            if value.const_value is None:
                raise ValueError(f"'{value.name}' depends on the unfed input '{value.name}'")
            initializers[value.name] = value
            continue
        if producer not in seen:
            seen.add(producer)
            stack.extend(v for v in producer.inputs if v is not None)
    order = {node: i for i, node in enumerate(model.graph)}
    needed = sorted(seen, key=order.__getitem__)

    def info(value: ir.Value) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(value.name, value.dtype.value, None)

    # Large weights go to ORT as arrays beside the proto, as in `ort_session` (a subgraph deep in
    # a model reads most of its weights: serialized, they were copied twice more).
    tensors, weights = [], {}
    for value in initializers.values():
        tensor = value.const_value
        if tensor.dtype in _NUMPY_DTYPES and tensor.nbytes >= 1 << 20:
            weights[value.name] = tensor.numpy()
            tensor = ir.ExternalTensor(IN_MEMORY, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=value.name)
        tensors.append(ir.serde.serialize_tensor(tensor))
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in needed], "subgraph", [info(v) for v in feeds], [info(v) for v in outputs],
        initializer=tensors)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
                                   ir_version=model.ir_version)
    opts = ort.SessionOptions()
    values = [ort.OrtValue.ortvalue_from_numpy(np.require(a, requirements="C")) for a in weights.values()]
    if values:
        opts.add_external_initializers(list(weights), values)
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run([v.name for v in outputs], {v.name: a for v, a in feeds.items()})

"""Rotate the residual stream of a pre-norm (RMSNorm) transformer by an orthogonal Q (QuaRot's R1).

    x₀ = Gather(E[V, H], ids)                        ->  Gather(E·Q, ids)                 (every x now x·Q)
    n = RMSNorm(x) ⊙ γ;  y = MatMul(n, W[H, N])      ->  RMSNorm(x·Q) ⊙ 1;  MatMul(·, Qᵀ·diag(γ)·W)
    x' = x + MatMul(a, W_o[K, H]) (+ b[H])           ->  x·Q + MatMul(a, W_o·Q) (+ b·Q)
    logits = MatMul(n, Transpose(E))  (tied head)    ->  MatMul(MatMul(RMSNorm(x·Q), Qᵀ·diag(γ)·Q), Transpose(E·Q))

Dims: V vocabulary, H hidden (the stream width), K and N the other side of each projection.
Why: weight-only quantization rounds every weight block to a grid set by its largest entry.
Folding each norm's γ into the projections and rotating by a random Hadamard matrix spreads
the few large input channels (outlier features, large γ) over all H channels, so the blocks
along H have no outliers left to set their scale (Ashkboos et al., QuaRot, 2024; Liu et al.,
SpinQuant, 2024). Exact in fp32: ‖x·Q‖ = ‖x‖, so RMSNorm commutes with Q, and Q·Qᵀ = I.
Nothing is added at run time except one H×H MatMul before a tied LM head, which keeps the
table shared by the embedding and the head (the head's γ cannot fold into a shared table).

`head_bits` (8; 0 = none) is a hint for quantize-weights on that H×H matrix: its error goes
straight into the logits, where layer-local error ranking does not see it. SmolLM2 int4-quality,
Lee 10 x 512: the matrix in fp32 instead of 4-bit lowers KL 0.116 -> 0.112, for 0.01 bits per weight;
at 8 bits in the int4-quality preset, rotation seeds 0 / 1 / 2: KL 0.103 -> 0.101, 0.107 -> 0.102,
0.101 -> 0.099 (the same compile without the hint).

Q (`kind`): "hadamard" is a Hadamard matrix of order H (Sylvester doublings of a Paley
construction; SmolLM2's 576 = 8 · 72) with random signs on its rows, scaled to be orthogonal;
where none is known for H it falls back to "random" (QR of a Gaussian matrix). `seed` fixes both.

Found from the graph, not from names: the stream starts at Gathers of constant 2-D tables
and runs through Adds; every reader of a stream value must be a residual Add (whose other
input a writer projection makes), the sum of squares of an RMSNorm (Pow 2 / Mul x·x, then
ReduceMean or ReduceSum over the last axis), the normalization by that per-row scale, a
γ Mul or SimplifiedLayerNormalization whose readers are projections, or a projection.
Not handled (the pass leaves the model unchanged and says which node stopped it): LayerNorm
(mean subtraction does not commute with Q), post-norm models, norms read by anything but
projections, the stream as a graph output, tables read in other ways.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from kiln.ir.values import const_array, new_initializer, remove_unused_initializers, set_const_input
from kiln.passes.analysis.linear import bias_of, weight_of
from kiln.passes.base import KilnPass
from kiln.passes.quantization import BITS_HINT
from kiln.passes.registry import register_pass

KINDS = ("hadamard", "random")

ROT, SQUARES, ROW_SCALE = "rotated", "squares", "row scale"  # value states; γ-scaled values map to γ


class _Unsupported(Exception):
    pass


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _paley(q: int) -> np.ndarray:
    """Paley's construction I: a Hadamard matrix of order q + 1 for a prime q ≡ 3 (mod 4)."""
    chi = -np.ones(q)
    chi[[(i * i) % q for i in range(1, q)]] = 1
    chi[0] = 0
    s = np.zeros((q + 1, q + 1))
    s[0, 1:], s[1:, 0] = 1, -1
    s[1:, 1:] = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]
    return s + np.eye(q + 1)


@functools.cache
def hadamard(n: int) -> np.ndarray | None:
    """A ±1 matrix with H·Hᵀ = n·I, or None when neither construction reaches n."""
    if n == 1:
        return np.ones((1, 1))
    if n % 4 and n != 2:
        return None
    if n % 2 == 0 and (half := hadamard(n // 2)) is not None:
        return np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), half)
    for m in range(4, n + 1, 4):
        if n % m == 0 and _is_prime(m - 1) and (rest := hadamard(n // m)) is not None:
            return np.kron(_paley(m - 1), rest)
    return None


def orthogonal(n: int, kind: str, seed: int) -> tuple[np.ndarray, str]:
    """An orthogonal n×n float64 matrix, and the kind actually built."""
    rng = np.random.default_rng(seed)
    h = hadamard(n) if kind == "hadamard" else None
    if h is not None:
        return rng.choice([-1.0, 1.0], size=n)[:, None] * h / np.sqrt(n), "hadamard"
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r)), "random"


def _scalar(value: ir.Value | None) -> bool:
    a = const_array(value)
    return a is not None and a.size == 1


def _last_axis_only(node: ir.Node, rank: int | None) -> bool:
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if axes is None and "axes" in node.attributes:
        axes = np.array(node.attributes.get_ints("axes"))
    if axes is None or axes.size != 1 or node.attributes.get_int("keepdims", 1) != 1:
        return False
    return int(axes.reshape(-1)[0]) == -1 or (rank is not None and int(axes.reshape(-1)[0]) == rank - 1)


@register_pass("rotate-residual")
class RotateResidualPass(KilnPass):
    def __init__(self, kind: str = "hadamard", seed: int = 0, head_bits: int = 8):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if head_bits not in (0, 4, 8):
            raise ValueError("head_bits must be 0 (no hint), 4 or 8")
        self.kind = kind
        self.seed = seed
        self.head_bits = head_bits

    def call(self, model: ir.Model):
        try:
            plan = _analyse(model)
        except _Unsupported as exc:
            return self.result(model, modified=False, stats={"norms": 0}, rejected=[str(exc)])
        if plan is None:
            return self.result(model, modified=False, stats={"norms": 0}, rejected=["no embedding table found"])
        q, kind = orthogonal(plan.width, self.kind, self.seed)
        graph = model.graph
        ones = new_initializer(graph, f"rotate_residual.ones{plan.width}", np.ones(plan.width, np.float32))
        for node, index in plan.gammas:
            node.replace_input_with(index, ones)
        for table in plan.tables:
            e = table.const_value.numpy()
            table.const_value = ir.tensor((e.astype(np.float64) @ q).astype(e.dtype), name=table.name)
        for node, (gamma, right) in plan.matmuls.items():
            w = node.inputs[1].const_value.numpy()
            new = w.astype(np.float64)
            if gamma is not None:
                new = q.T @ (gamma[:, None] * new)
            if right:
                new = new @ q
            set_const_input(graph, node, 1, new.astype(w.dtype), ".rotated")
        for add, index in plan.biases:
            b = add.inputs[index].const_value.numpy()
            set_const_input(graph, add, index, (b.astype(np.float64) @ q).astype(b.dtype), ".rotated")
        for head, gamma in plan.tied_heads:
            g = (q.T * gamma[None, :]) @ q  # Qᵀ·diag(γ)·Q: back to γ in the table's rotated basis
            value = new_initializer(graph, "rotate_residual.head", g.astype(np.float32))
            if self.head_bits:
                value.metadata_props[BITS_HINT] = str(self.head_bits)
            x = head.inputs[0]
            mm = ir.node("MatMul", [x, value], num_outputs=1)
            mm.outputs[0].dtype, mm.outputs[0].shape = x.dtype, x.shape
            mm.outputs[0].name = f"{x.name}.unrotated"
            graph.insert_before(head, mm)
            head.replace_input_with(0, mm.outputs[0])
        remove_unused_initializers(model)
        return self.result(model, modified=True, stats={
            "width": plan.width, "hadamard": int(kind == "hadamard"), "tables": len(plan.tables),
            "norms": len(plan.gammas), "readers": sum(g is not None for g, _ in plan.matmuls.values()),
            "writers": sum(r for _, r in plan.matmuls.values()), "tied_heads": len(plan.tied_heads)})


class _Plan:
    def __init__(self, width: int, tables: list[ir.Value]):
        self.width = width
        self.tables = tables
        self.gammas: list[tuple[ir.Node, int]] = []  # γ inputs to set to ones
        self.matmuls: dict[ir.Node, tuple[np.ndarray | None, bool]] = {}  # (left γ fold, right rotation)
        self.biases: list[tuple[ir.Node, int]] = []
        self.tied_heads: list[tuple[ir.Node, np.ndarray]] = []

    def read(self, node: ir.Node, gamma: np.ndarray) -> None:
        old = self.matmuls.get(node, (None, False))
        self.matmuls[node] = (gamma, old[1])

    def write(self, node: ir.Node, bias: tuple[ir.Node, int] | None) -> None:
        old = self.matmuls.get(node, (None, False))
        self.matmuls[node] = (old[0], True)
        if bias is not None:
            self.biases.append(bias)


def _writer(add: ir.Node, branch: ir.Value, width: int) -> tuple[ir.Node, tuple[ir.Node, int] | None]:
    """The projection (and its bias Add) that makes `branch`, the non-stream input of a residual Add."""
    def projects_to_stream(node: ir.Node | None) -> bool:
        return node is not None and (w := weight_of(node)) is not None and w.shape[1] == width

    producer = branch.producer()
    if producer is not None and len(list(branch.uses())) == 1 and not branch.is_graph_output():
        if projects_to_stream(producer):
            return producer, None
        for v in producer.inputs if producer.op_type == "Add" else ():
            matmul = v.producer() if v is not None else None
            if projects_to_stream(matmul) and (bias := bias_of(matmul)) is not None and bias[0] is producer:
                return matmul, bias
    raise _Unsupported(f"Add '{add.name}' adds something other than a projection to the residual stream")


def _analyse(model: ir.Model) -> _Plan | None:
    """Every value in the rotated basis, and what changes; raises _Unsupported naming the node."""
    graph = model.graph
    gathers = [n for n in graph if n.op_type == "Gather" and n.domain in ("", "ai.onnx")
               and n.inputs[0] is not None and n.inputs[0].const_value is not None
               and len(n.inputs[0].const_value.shape) == 2 and n.attributes.get_int("axis", 0) == 0
               and n.inputs[0].const_value.dtype.is_floating_point()]
    if not gathers:
        return None
    widths = {n.inputs[0].const_value.shape[1] for n in gathers}
    if len(widths) != 1:
        raise _Unsupported(f"embedding tables of different widths {sorted(widths)}")
    width = widths.pop()
    tables = list(dict.fromkeys(n.inputs[0] for n in gathers))
    plan = _Plan(width, tables)
    state: dict[ir.Value, object] = {n.outputs[0]: ROT for n in gathers}
    heads: list[ir.Node] = []  # MatMuls reading Transpose(table)
    for table in tables:
        for use in table.uses():
            reader = use.node
            if reader in gathers and use.idx == 0:
                continue
            if reader.op_type == "Transpose" and list(reader.attributes.get_ints("perm", [1, 0])) == [1, 0]:
                for u in reader.outputs[0].uses():
                    if u.node.op_type != "MatMul" or u.idx != 1:
                        raise _Unsupported(f"{u.node.op_type} '{u.node.name}' reads the transposed embedding table")
                    heads.append(u.node)
                continue
            raise _Unsupported(f"{reader.op_type} '{reader.name}' reads the embedding table {table.name}")

    def fail(node: ir.Node, why: str = "reads the residual stream") -> None:
        raise _Unsupported(f"{node.op_type} '{node.name}' {why}")

    for node in graph:
        tracked = [state.get(v) for v in node.inputs]
        if all(s is None for s in tracked):
            continue
        if node.domain not in ("", "ai.onnx"):
            fail(node)
        op, ins, out = node.op_type, node.inputs, node.outputs[0]
        kinds = [s if not isinstance(s, np.ndarray) else "gamma" for s in tracked]
        if "gamma" in kinds:  # a γ-scaled norm output: only projections may read it
            if op == "MatMul" and kinds == ["gamma", None] and weight_of(node) is not None:
                plan.read(node, tracked[0])
                continue
            if op == "MatMul" and kinds == ["gamma", None] and node in heads:
                plan.tied_heads.append((node, tracked[0]))
                continue
            fail(node, "reads a normalized stream value (only projections may)")
        if op in ("Add", "Sub") and kinds == [ROT, ROT]:
            state[out] = ROT
        elif op == "Add" and ROT in kinds and None in kinds:
            plan.write(*_writer(node, ins[kinds.index(None)], width))
            state[out] = ROT
        elif op == "Pow" and kinds == [ROT, None] and (e := const_array(ins[1])) is not None and e.size == 1 \
                and float(e.reshape(-1)[0]) == 2.0:
            state[out] = SQUARES
        elif op == "Mul" and kinds == [ROT, ROT] and ins[0] is ins[1]:
            state[out] = SQUARES
        elif op in ("ReduceMean", "ReduceSum") and kinds[0] == SQUARES and all(k is None for k in kinds[1:]) \
                and _last_axis_only(node, len(ins[0].shape) if ins[0].shape is not None else None):
            state[out] = ROW_SCALE
        elif op in ("Add", "Mul", "Div", "Sqrt", "Reciprocal", "Cast", "Identity", "Max") \
                and all(k == ROW_SCALE or (k is None and _scalar(v)) for k, v in zip(kinds, ins)):
            state[out] = ROW_SCALE
        elif op in ("Mul", "Div") and kinds[0] == ROT and (kinds[1] == ROW_SCALE or _scalar(ins[1])) \
                or op == "Mul" and kinds[1] == ROT and (kinds[0] == ROW_SCALE or _scalar(ins[0])):
            state[out] = ROT
        elif op == "Mul" and ROT in kinds and None in kinds:
            gamma = const_array(ins[kinds.index(None)])
            if gamma is None or gamma.shape != (width,):
                fail(node, "scales the residual stream by something other than a per-channel constant")
            plan.gammas.append((node, kinds.index(None)))
            state[out] = gamma.astype(np.float64)
        elif op in ("Cast", "Identity") and kinds == [ROT]:
            state[out] = ROT
        elif op == "SimplifiedLayerNormalization" and kinds[0] == ROT and len(ins) == 2 \
                and node.attributes.get_int("axis", -1) in (-1, len(ins[0].shape or ()) - 1) \
                and (gamma := const_array(ins[1])) is not None and gamma.shape == (width,) \
                and not any(o.uses() for o in node.outputs[1:]):
            plan.gammas.append((node, 1))
            state[out] = gamma.astype(np.float64)
        elif op == "MatMul" and kinds == [ROT, None] and weight_of(node) is not None:
            plan.read(node, np.ones(width))
        elif op == "MatMul" and kinds == [ROT, None] and node in heads:
            plan.tied_heads.append((node, np.ones(width)))
        else:
            fail(node)
        if out.is_graph_output() and out in state and state[out] is not ROW_SCALE:
            fail(node, "makes a graph output from the residual stream")
    for head in heads:
        if head not in {h for h, _ in plan.tied_heads}:
            raise _Unsupported(f"MatMul '{head.name}' reads the transposed table but not the normalized stream")
    if not plan.gammas:
        raise _Unsupported("no RMSNorm found on the residual stream")
    return plan

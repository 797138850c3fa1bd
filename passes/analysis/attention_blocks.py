"""Attention blocks: per attention that `kiln.passes.analysis.attention` finds, the Q, K, V and
O projections (each one linear layer), the query and kv head counts and the head dims, and the
nodes between the projections and O. The pruning passes edit heads through this."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from kiln.ir import dims
from kiln.ir.values import ancestors, descendants, is_const
from kiln.passes.analysis.attention import LAYOUT_OPS, Attention, find_attentions
from kiln.passes.analysis.linear import bias_of, linear_output, weight_of


@dataclasses.dataclass
class AttentionBlock:
    softmax: ir.Node
    q: ir.Node
    k: ir.Node
    v: ir.Node
    o: ir.Node
    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    region: list[ir.Node]  # nodes from the projections' outputs to the O projection (graph order)

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads


def _projection_above(value: ir.Value, limit: int = 256) -> set[ir.Node] | str:
    found: set[ir.Node] = set()
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        p = v.producer()
        if p is None or p in seen or is_const(v):
            continue
        seen.add(p)
        if len(seen) > limit:
            return "too far from a projection"
        if weight_of(p) is not None:
            found.add(p)
            continue
        if p.op_type in ("Softmax", "MatMul", "Gather", "ReduceMean", "LayerNormalization"):
            continue
        stack.extend(i for i in p.inputs if i is not None)
    return found


def _projection_below(value: ir.Value, limit: int = 8) -> ir.Node | None:
    for _ in range(limit):
        uses = list(value.uses())
        if len(uses) != 1:
            return None
        node = uses[0].node
        if weight_of(node) is not None and uses[0].idx == 0:
            return node
        if node.op_type not in LAYOUT_OPS:
            return None
        value = node.outputs[0]
    return None


def find_attention_blocks(model: ir.Model) -> tuple[list[AttentionBlock], list[str]]:
    """Per attention found by `find_attentions`, its projections and head counts; a reason per rejected one."""
    order = {n: i for i, n in enumerate(model.graph)}
    found, rejected = [], []
    for sm, att in find_attentions(model):
        if not isinstance(att, Attention):
            rejected.append(f"{sm.name}: not a Softmax(Q·Kᵀ)·V attention ({att})")
            continue
        qk, pv = att.qk, att.pv
        projs = [_projection_above(qk.inputs[0]), _projection_above(qk.inputs[1]), _projection_above(pv.inputs[1])]
        if any(isinstance(s, str) or len(s) != 1 for s in projs):
            rejected.append(f"{sm.name}: Q, K and V are not each one projection")
            continue
        q, k, v = (next(iter(s)) for s in projs)
        if len({q, k, v}) != 3:
            rejected.append(f"{sm.name}: Q, K, V come from one packed projection (not handled)")
            continue
        o = _projection_below(pv.outputs[0])
        if o is None:
            rejected.append(f"{sm.name}: no output projection after the attention")
            continue
        qo, ko, vo = (linear_output(n) for n in (q, k, v))
        heads = dims(qk.inputs[0])
        vh = dims(pv.outputs[0])
        wq, wk, wv, wo = (weight_of(n) for n in (q, k, v, o))
        if not heads or len(heads) != 4 or not isinstance(heads[1], int) or not isinstance(heads[3], int):
            rejected.append(f"{sm.name}: Q is not annotated [B, H, S, Dh]")
            continue
        h, dh = heads[1], heads[3]
        dv = vh[3] if vh and isinstance(vh[3], int) else None
        if wq.shape[1] != h * dh or dv is None or wv.shape[1] % dv or wk.shape[1] % dh or wo.shape[0] != h * dv:
            rejected.append(f"{sm.name}: projection widths do not match {h} heads of {dh}")
            continue
        hkv = wk.shape[1] // dh
        if wv.shape[1] // dv != hkv or h % hkv:
            rejected.append(f"{sm.name}: {h} query heads do not group over the kv heads")
            continue
        region = (descendants([qo, ko, vo]) & ancestors([o.inputs[0]])) | {n for n in (bias_of(q), bias_of(k), bias_of(v)) if n for n in [n[0]]}
        found.append(AttentionBlock(sm, q, k, v, o, h, hkv, dh, dv, sorted(region, key=order.__getitem__)))
    return found, rejected


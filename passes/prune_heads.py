"""Structured pruning of attention heads, scored on calibration activations, GQA kept consistent.

    per attention: Q = X·W_q[D, H·Dh], K = X·W_k[D, Hkv·Dh], V = X·W_v[D, Hkv·Dv],
                   Y = concat_h(softmax(Q_h K_g(h)ᵀ) V_g(h)) · W_o[H·Dv, D']
  ->
    unit="query": in every KV group of a layer the same number of query heads is removed
                  (H' = Hkv·n', n' ≥ 1): W_q columns and W_o rows of those heads; K, V, the KV
                  cache and Hkv stay (layers may keep different n');
    unit="group": whole KV groups are removed, the same number in every layer (the KV cache has
                  one head count): W_k, W_v columns of the group, W_q columns and W_o rows of its
                  query heads; H' = Hkv'·n_rep.
  Biases of the projections are cut with their columns. Every head-count constant of the
  attention subgraph (Reshape and Expand targets: [B, S, H, Dh], the GQA repeat [B, Hkv, n_rep,
  S, Dh] -> [B, H, S, Dh]) is rewritten; a target shared with other layers is copied first.
  Which axis of a target is a head axis is followed from the projections through the layout
  ops (Reshape axis groups, Transpose, Unsqueeze, Expand, MatMul, elementwise) on the annotated
  shapes; the annotations are then refreshed from one short ORT run.

Attentions are found as insert-kv-cache finds them (Softmax over Q·Kᵀ, the MatMul reading the
probabilities) and their projections by walking to the nearest constant-weight MatMuls
(`kiln.passes.analysis.attention_blocks`): no names, no per-architecture code. Removing a head
is exactly zeroing its W_o rows, which the tests check.

Importance of query head h: its share of the output projection's energy on calibration text,
tr(W_o[h]ᵀ G_hh W_o[h]) with G = Σ yᵀy of the attention output (normalised per layer); a group's
importance is the sum of its heads'. With `refit=true` (default) the kept rows of W_o are refitted
by least squares on the calibration activations.

How much: `ratio=f` removes round(f·n_rep) query heads per group (unit=query) or round(f·Hkv)
groups (unit=group) in every layer; `target_params=p` (or `target_mb`) removes the least important
until the model has p × its parameters (embeddings included). Lossy (metric KL by default).
Stats: params_before/after/removed, heads before/after per layer. Not handled: Q/K/V packed in
one MatMul (GPT-2's c_attn, or after pack-matmuls: run this pass first), Gemm, heads on a non-leading
layout (Dh-major), cross-attention.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from kiln.errors import KilnError
from kiln.ir import dims, kv_layout
from kiln.ir.values import const_array, new_initializer, param_count, remove_unused_initializers, set_const_input
from kiln.passes.analysis.attention_blocks import AttentionBlock, find_attention_blocks
from kiln.passes.analysis.linear import bias_of, linear_output, weight_of
from kiln.passes.calibration import grams, refresh_shapes, require, short_feed
from kiln.passes.registry import register_pass
from kiln.passes.structural import StructuralPass, refit_rows


class HeadLayoutError(KilnError):
    pass


@dataclasses.dataclass
class _Plan:
    att: AttentionBlock
    q_keep: list[int]  # old query head indices, in the new order
    kv_keep: list[int]  # old kv groups, in the new order


# ---------------------------------------------------------------- following head axes

def _groups(a: list, b: list) -> list[tuple[list[int], list[int]]] | None:
    """Axis groups of a reshape a -> b with equal products (symbolic dims match one to one)."""
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            out.append(([i], []))
            i += 1
            continue
        if j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            out.append(([], [j]))
            j += 1
            continue
        if i >= len(a) or j >= len(b):
            return None
        if not isinstance(a[i], int) or not isinstance(b[j], int):
            if a[i] != b[j] or a[i] is None:
                return None
            out.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        gi, gj, pi, pj = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i >= len(a) or not isinstance(a[i], int):
                    return None
                pi *= a[i]
                gi.append(i)
                i += 1
            else:
                if j >= len(b) or not isinstance(b[j], int):
                    return None
                pj *= b[j]
                gj.append(j)
                j += 1
        out.append((gi, gj))
    return out


def _merge_unit_axes(groups, roles_in):
    """A size-1 axis that is a head axis (one kv head) belongs to the group next to it."""
    out = []
    pending = None
    for gi, gj in groups:
        if pending is not None:
            gi, gj = pending[0] + gi, pending[1] + gj
            pending = None
        if not gi or not gj:
            carries = any(roles_in[a] is not None for a in gi)
            if carries or (not gi):
                pending = (gi, gj)
                continue
        out.append((gi, gj))
    if pending is not None:
        if out:
            out[-1] = (out[-1][0] + pending[0], out[-1][1] + pending[1])
        else:
            out.append(pending)
    return out


_MERGE = {("q", None): "qd", ("kv", None): "kd"}
_SPLIT = {"qd": ["q", None], "kd": ["kv", None]}


def _follow(att: AttentionBlock, sizes_old: dict, sizes_new: dict) -> tuple[dict, dict]:
    """Roles of the axes of every value in the attention region, and the target rewrites
    {(node, input index): {axis: new size}}; also the query-head layout ('interleaved' / 'tiled')."""
    roles: dict[ir.Value, list] = {}
    for proj, role in ((att.q, "qd"), (att.k, "kd"), (att.v, "kd")):
        out = linear_output(proj)
        d = dims(out)
        if not d:
            raise HeadLayoutError("a projection output has no annotated shape")
        roles[out] = [None] * (len(d) - 1) + [role]
    rewrites: dict[ir.Node, dict[int, int]] = {}
    layout = {"q": None}
    skip = {n for n in (bias_of(att.q), bias_of(att.k), bias_of(att.v)) if n for n in [n[0]]}

    def need(node, out_roles, out_dims):
        changes = {}
        for axis, r in enumerate(out_roles):
            if r is not None and sizes_old[r] != sizes_new[r]:
                changes[axis] = (sizes_old[r], sizes_new[r])
        if changes:
            rewrites[node] = changes

    for node in att.region:
        if node in skip or node.op_type == "Shape":
            continue
        ins = [roles.get(i) if i is not None else None for i in node.inputs]
        if all(r is None or all(x is None for x in r) for r in ins):
            continue
        out = node.outputs[0]
        od = dims(out)
        op = node.op_type
        if op == "Reshape":
            idim = dims(node.inputs[0])
            if not idim or not od or None in idim or None in od:
                continue  # target computed from shapes at run time: it follows by itself
            groups = _groups(idim, od)
            if groups is None:
                raise HeadLayoutError(f"cannot follow the head axes through Reshape {idim} -> {od}")
            groups = _merge_unit_axes(groups, ins[0])
            r_out = [None] * len(od)
            for gi, gj in groups:
                r_in = tuple(ins[0][a] for a in gi)
                if len(gi) == 1 and len(gj) == 1:
                    r_out[gj[0]] = r_in[0]
                elif all(x is None for x in r_in):
                    continue
                elif len(gi) == 1 and r_in[0] in _SPLIT and len(gj) == 2:
                    r_out[gj[0]], r_out[gj[1]] = _SPLIT[r_in[0]]
                elif r_in in _MERGE and len(gj) == 1:
                    r_out[gj[0]] = _MERGE[r_in]
                elif r_in in (("kv", "rep"), ("rep", "kv")) and len(gj) == 1:
                    r_out[gj[0]] = "q"
                    layout["q"] = "interleaved" if r_in[0] == "kv" else "tiled"
                    layout.setdefault("repeats", []).append(node)
                else:
                    raise HeadLayoutError(f"cannot follow the head axes {r_in} through Reshape {idim} -> {od}")
            roles[out] = r_out
            need(node, r_out, od)
        elif op == "Expand":
            idim = dims(node.inputs[0])
            if not idim or not od:
                raise HeadLayoutError("Expand without annotated shapes in the attention")
            pad = len(od) - len(idim)
            r_in = [None] * pad + list(ins[0])
            idim = [1] * pad + list(idim)
            r_out = list(r_in)
            for a in range(len(od)):
                if r_in[a] is None and idim[a] == 1 and od[a] == sizes_old["rep"] and sizes_old["rep"] > 1:
                    r_out[a] = "rep"
            roles[out] = r_out
            need(node, r_out, od)
        elif op == "Transpose":
            perm = node.attributes.get_ints("perm", None) or list(reversed(range(len(ins[0]))))
            roles[out] = [ins[0][p] for p in perm]
        elif op in ("Unsqueeze", "Squeeze"):
            axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if axes is None:
                raise HeadLayoutError(f"{op} without constant axes in the attention")
            r = list(ins[0])
            if op == "Unsqueeze":
                rank = len(r) + axes.size
                for a in sorted(int(x) % rank for x in axes.reshape(-1)):
                    r.insert(a, None)
            else:
                rank = len(r)
                for a in sorted((int(x) % rank for x in axes.reshape(-1)), reverse=True):
                    if r[a] is not None:
                        raise HeadLayoutError("Squeeze of a head axis")
                    del r[a]
            roles[out] = r
        elif op == "MatMul":
            a, b = ins[0] or [], ins[1] or []
            rank = max(len(a), len(b), len(od or []))
            a_al = [None] * (rank - len(a)) + list(a)
            b_al = [None] * (rank - len(b)) + list(b)
            r = [x if x is not None else y for x, y in zip(a_al[:-2], b_al[:-2])]
            roles[out] = r + [a_al[-2] if a else None, b_al[-1] if b else None]
        else:
            rank = max(len(r) for r in ins if r is not None)
            r_out = [None] * rank
            for r in ins:
                if r is None:
                    continue
                al = [None] * (rank - len(r)) + list(r)
                r_out = [x if x is not None else y for x, y in zip(r_out, al)]
            if op in ("Concat", "Split", "Slice", "Gather"):
                axis = node.attributes.get_int("axis", 0) if op != "Slice" else None
                if axis is not None and r_out[axis % rank] is not None:
                    raise HeadLayoutError(f"{op} along a head axis")
                if op == "Slice" and len(node.inputs) > 3 and node.inputs[3] is not None:
                    axes = const_array(node.inputs[3])
                    if axes is None or any(r_out[int(x) % rank] is not None for x in axes.reshape(-1)):
                        raise HeadLayoutError("Slice along a head axis")
            for o in node.outputs:
                roles[o] = r_out
    return rewrites, layout


def _new_target(graph: ir.Graph, node: ir.Node, changes: dict[int, tuple[int, int]]) -> None:
    """Give `node` (Reshape/Expand) a target with the head entries changed (a copy: targets are shared)."""
    target = node.inputs[1]
    arr = const_array(target)
    if arr is not None:
        arr = arr.copy()
        for axis, (old, new) in changes.items():
            if arr[axis] == old:
                arr[axis] = new
            elif arr[axis] not in (-1, 0, 1):
                raise HeadLayoutError(f"{node.op_type} target entry {arr[axis]} at axis {axis} is not {old}")
        set_const_input(graph, node, 1, arr, ".heads")
        return
    p = target.producer()
    if p is None or p.op_type != "Concat":
        return  # computed at run time from shapes that already changed
    pieces, offset, changed = [], 0, False
    for piece in p.inputs:
        d = dims(piece)
        c = const_array(piece)
        length = c.size if c is not None else (d[0] if d and isinstance(d[0], int) else None)
        if length is None:
            raise HeadLayoutError("a shape target piece of unknown length")
        if c is not None:
            c = c.reshape(-1).copy()
            for k in range(length):
                axis = offset + k
                if axis in changes and c[k] == changes[axis][0]:
                    c[k] = changes[axis][1]
                    changed = True
            v = new_initializer(graph, f"{node.name}.heads.{offset}", c.astype(np.int64))
            pieces.append(v)
        else:
            pieces.append(piece)
        offset += length
    if changed:
        concat = ir.node("Concat", pieces, attributes={"axis": 0}, num_outputs=1)
        concat.outputs[0].dtype, concat.outputs[0].shape = target.dtype, target.shape
        graph.insert_before(node, concat)
        node.replace_input_with(1, concat.outputs[0])


# ---------------------------------------------------------------- the pass

def _cols(heads: list[int], size: int) -> np.ndarray:
    return np.concatenate([np.arange(h * size, (h + 1) * size) for h in heads]) if heads else np.zeros(0, int)


@register_pass("prune-heads")
class PruneHeadsPass(StructuralPass):
    def __init__(self, target_params: float = 0.0, target_mb: float = 0.0, ratio: float = 0.0, unit: str = "query",
                 refit: bool = True, metric: str = "kl", budget: float = 1.0):
        super().__init__(target_params, target_mb, metric, budget, {"ratio": ratio})
        if not 0 <= ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        if unit not in ("query", "group"):
            raise ValueError(f"unit must be 'query' (query heads within KV groups) or 'group' (whole KV groups), got '{unit}'")
        self.ratio, self.unit, self.refit = ratio, unit, refit

    def call(self, model: ir.Model):
        if kv_layout(model) is not None:
            raise KilnError("prune-heads: the model already has a KV cache; put this pass before insert-kv-cache "
                            "(the cache's layers and heads follow the pruned model)")
        before = param_count(model)
        atts, rejected = find_attention_blocks(model)
        base = {"params_before": before, "params_after": before, "params_removed": 0, "attentions": len(atts)}
        if (unchanged := self.nothing_to_do(model, atts, rejected, "attention", base)) is not None:
            return unchanged
        keep_total = self.keep(model)
        if self.unit == "query" and any(a.n_rep == 1 for a in atts):
            raise KilnError("prune-heads: unit='query' needs grouped-query attention (more query than kv heads); "
                            "this model has one query head per kv head: use unit='group'")
        if self.unit == "group" and len({a.kv_heads for a in atts}) != 1:
            raise KilnError("prune-heads: unit='group' needs the same kv head count in every layer")
        if keep_total is not None:
            self._check_capacity(atts, before - keep_total, before)
        feeds = require(self.calibration, "prune-heads")
        names = list(dict.fromkeys(a.o.inputs[0].name for a in atts))
        stats = grams(model, feeds, names)
        energies = [self._head_energy(a, stats[a.o.inputs[0].name]) for a in atts]
        plans = self._plan(model, atts, energies, keep_total, before)
        layouts = []
        for plan in plans:
            layouts.append(self._apply(model.graph, plan, stats[plan.att.o.inputs[0].name]))
        refresh_shapes(model, short_feed(self.calibration, model))
        remove_unused_initializers(model)
        after = param_count(model)
        out = {**base, "params_after": after, "params_removed": before - after, "fraction_kept": round(after / before, 4),
               "heads_before": ",".join(str(a.heads) for a in atts),
               "heads_after": ",".join(str(len(p.q_keep)) for p in plans),
               "kv_heads_after": ",".join(str(len(p.kv_keep)) for p in plans),
               "refit": int(bool(self.refit))}
        return self.result(model, modified=after != before, stats=out, rejected=rejected)

    @staticmethod
    def _head_energy(att: AttentionBlock, st) -> np.ndarray:
        g = st.gram / max(st.rows, 1)
        wo = weight_of(att.o).astype(np.float64)
        dv = att.v_head_dim
        e = np.array([np.einsum("ij,ik,kj->", wo[h * dv:(h + 1) * dv], g[h * dv:(h + 1) * dv, h * dv:(h + 1) * dv],
                                wo[h * dv:(h + 1) * dv]) for h in range(att.heads)])
        return e / max(float(e.sum()), 1e-300)

    @staticmethod
    def _group_of(att: AttentionBlock, h: int, layout: str) -> tuple[int, int]:
        """(kv group, index within the group) of query head h."""
        return (h // att.n_rep, h % att.n_rep) if layout == "interleaved" else (h % att.kv_heads, h // att.kv_heads)

    def _costs(self, att: AttentionBlock) -> tuple[int, int]:
        """Parameters of one query head (W_q cols + bias, W_o rows) and of one kv group without its query heads."""
        wq, wk, wo = weight_of(att.q), weight_of(att.k), weight_of(att.o)
        bias = lambda n: 1 if bias_of(n) else 0
        q_head = att.head_dim * (wq.shape[0] + bias(att.q)) + att.v_head_dim * wo.shape[1]
        kv = att.head_dim * (wk.shape[0] + bias(att.k)) + att.v_head_dim * (weight_of(att.v).shape[0] + bias(att.v))
        return q_head, kv

    def _check_capacity(self, atts: list[AttentionBlock], to_remove: int, before: int) -> None:
        """Fail before any calibration work when the target is out of reach."""
        if self.unit == "query":
            capacity = sum((a.n_rep - 1) * a.kv_heads * self._costs(a)[0] for a in atts)
            what = "leaving one query head per group"
        else:
            capacity = (atts[0].kv_heads - 1) * sum(self._costs(a)[1] + a.n_rep * self._costs(a)[0] for a in atts)
            what = "leaving one kv group per layer"
        if capacity < to_remove:
            raise KilnError(f"prune-heads: cannot remove {to_remove:,} parameters with unit='{self.unit}': at most "
                            f"{capacity:,} ({capacity / before:.1%} of the model) {what}")

    def _plan(self, model, atts: list[AttentionBlock], energies, keep_total, before) -> list[_Plan]:
        layouts = [_layout(a) for a in atts]
        order_in_group = []  # per attention: per group, query heads (within-group index) from least to most important
        for a, e, lay in zip(atts, energies, layouts):
            groups = [[] for _ in range(a.kv_heads)]
            for h in range(a.heads):
                g, r = self._group_of(a, h, lay)
                groups[g].append((e[h], r))
            order_in_group.append([[r for _, r in sorted(gr)] for gr in groups])
        to_remove = (before - keep_total) if keep_total is not None else None
        if self.unit == "query":
            removed_per_layer = [0] * len(atts)
            if self.ratio:
                removed_per_layer = [min(round(self.ratio * a.n_rep), a.n_rep - 1) for a in atts]
            else:
                costs = [a.kv_heads * self._costs(a)[0] for a in atts]
                capacity = sum((a.n_rep - 1) * c for a, c in zip(atts, costs))
                if capacity < to_remove:
                    raise KilnError(f"prune-heads: cannot remove {to_remove:,} parameters with unit='query': at most "
                                    f"{capacity:,} ({capacity / before:.1%} of the model) leaving one query head per group")
                removed = 0
                while removed < to_remove:
                    best, damage = None, None
                    for i, a in enumerate(atts):
                        k = removed_per_layer[i]
                        if k >= a.n_rep - 1:
                            continue
                        d = sum(energies[i][self._head_index(a, g, order_in_group[i][g][k], layouts[i])]
                                for g in range(a.kv_heads))
                        if damage is None or d < damage:
                            best, damage = i, d
                    removed_per_layer[best] += 1
                    removed += costs[best]
            plans = []
            for i, a in enumerate(atts):
                k = removed_per_layer[i]
                kept_r = [sorted(order_in_group[i][g][k:]) for g in range(a.kv_heads)]
                n_new = a.n_rep - k
                if layouts[i] == "interleaved":
                    q_keep = [self._head_index(a, g, kept_r[g][r], layouts[i]) for g in range(a.kv_heads) for r in range(n_new)]
                else:
                    q_keep = [self._head_index(a, g, kept_r[g][r], layouts[i]) for r in range(n_new) for g in range(a.kv_heads)]
                plans.append(_Plan(a, q_keep, list(range(a.kv_heads))))
            return plans
        # unit = group: the same number of groups in every layer
        hkv = atts[0].kv_heads
        group_energy = [[sum(e[self._head_index(a, g, r, lay)] for r in range(a.n_rep)) for g in range(a.kv_heads)]
                        for a, e, lay in zip(atts, energies, layouts)]
        if self.ratio:
            n = min(round(self.ratio * hkv), hkv - 1)
        else:
            per_group = sum(self._costs(a)[1] + a.n_rep * self._costs(a)[0] for a in atts)
            n = int(np.ceil(to_remove / per_group)) if to_remove > 0 else 0
            if n > hkv - 1:
                raise KilnError(f"prune-heads: cannot remove {to_remove:,} parameters with unit='group': at most "
                                f"{(hkv - 1) * per_group:,} leaving one kv group per layer")
        plans = []
        for a, ge, lay in zip(atts, group_energy, layouts):
            kv_keep = sorted(np.argsort(ge, kind="stable")[n:].tolist())
            if lay == "interleaved":
                q_keep = [self._head_index(a, g, r, lay) for g in kv_keep for r in range(a.n_rep)]
            else:
                q_keep = [self._head_index(a, g, r, lay) for r in range(a.n_rep) for g in kv_keep]
            plans.append(_Plan(a, q_keep, kv_keep))
        return plans

    @staticmethod
    def _head_index(att: AttentionBlock, g: int, r: int, layout: str) -> int:
        return g * att.n_rep + r if layout == "interleaved" else r * att.kv_heads + g

    def _apply(self, graph: ir.Graph, plan: _Plan, st) -> str:
        a = plan.att
        if len(plan.q_keep) == a.heads and len(plan.kv_keep) == a.kv_heads:
            return "unchanged"
        new_heads, new_kv = len(plan.q_keep), len(plan.kv_keep)
        old = {"q": a.heads, "kv": a.kv_heads, "rep": a.n_rep, "qd": a.heads * a.head_dim, "kd": a.kv_heads * a.head_dim}
        new = {"q": new_heads, "kv": new_kv, "rep": new_heads // new_kv, "qd": new_heads * a.head_dim,
               "kd": new_kv * a.head_dim}
        if a.v_head_dim != a.head_dim:
            raise HeadLayoutError("value head dim differs from the key head dim (not handled)")
        rewrites, layout = _follow(a, old, new)
        for node, changes in rewrites.items():
            if node.op_type in ("Reshape", "Expand"):
                _new_target(graph, node, changes)
        if new["rep"] == 1:  # one query head per kv head: the GQA repeat is the identity, drop it
            for reshape in layout.get("repeats", []):
                x = reshape.inputs[0]
                while x.producer() is not None and x.producer().op_type in ("Expand", "Unsqueeze"):
                    x = x.producer().inputs[0]
                reshape.outputs[0].replace_all_uses_with(x)
        q_cols, kv_cols = _cols(plan.q_keep, a.head_dim), _cols(plan.kv_keep, a.head_dim)
        for proj, cols in ((a.q, q_cols), (a.k, kv_cols), (a.v, _cols(plan.kv_keep, a.v_head_dim))):
            bias = bias_of(proj)
            set_const_input(graph, proj, 1, weight_of(proj)[:, cols], ".pruned")
            if bias:
                add, idx = bias
                set_const_input(graph, add, idx, const_array(add.inputs[idx])[cols], ".pruned")
        rows = _cols(plan.q_keep, a.v_head_dim)
        wo = weight_of(a.o)
        set_const_input(graph, a.o, 1, refit_rows(st.gram, st.rows, rows, wo) if self.refit else wo[rows], ".pruned")
        for proj, width in ((a.q, len(q_cols)), (a.k, len(kv_cols)), (a.v, len(kv_cols))):
            for v in {proj.outputs[0], *[o for u in proj.outputs[0].uses() if u.node.op_type == "Add" for o in u.node.outputs]}:
                if v.shape is not None:
                    v.shape = ir.Shape([*list(v.shape)[:-1], width])
        return "pruned"


def _layout(att: AttentionBlock) -> str:
    """'interleaved' (query head h in group h // n_rep, HF repeat_kv) or 'tiled' (group h % Hkv)."""
    if att.n_rep == 1:
        return "interleaved"
    sizes = {"q": att.heads, "kv": att.kv_heads, "rep": att.n_rep, "qd": att.heads * att.head_dim,
             "kd": att.kv_heads * att.head_dim}
    _, layout = _follow(att, sizes, sizes)
    if layout["q"] is None:
        raise HeadLayoutError("cannot tell how query heads map to kv groups (no GQA repeat found)")
    return layout["q"]

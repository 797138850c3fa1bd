"""Split an embedding table into the rows of its most frequent tokens and the rest (exact), so
that `quantize-weights` keeps the frequent rows at 8 bits and the rest at 4.

    Gather(E[V, H], ids)
  ->
    r = Gather(rank[V] int32, ids)                              # each token's row in frequency order
    Where(Unsqueeze(r < F, -1), Gather(E_hot[F, H], Min(r, F - 1)), Gather(E_cold[V - F, H], Max(r - F, 0)))

    MatMul(x[..., H], Transpose(E))                             # a tied LM head
  ->
    Gather(Concat(MatMul(x, Transpose(E_hot)), MatMul(x, Transpose(E_cold)), axis=-1), rank, axis=-1)

Dims: V vocabulary, H hidden, F = `rows` hot rows. E_hot = E[order[:F]], E_cold = E[order[F:]],
rank = the inverse of `order`; `order` sorts the tokens by how often they occur in the
calibration text (the Gather's indices over the calibration feeds), ties and unseen tokens by id.
E_hot carries the precision hint `kiln.quantize.bits = 8` and rank `kiln.quantize.index` (the
names of E_hot and E_cold), which `quantize-weights` reads: it keeps E_hot at 8 bits and, when it
quantizes the halves, counts rank's bits in its bits per weight.

Why: a tied table is about a fifth of a small LLM's weights and its 4-bit error reaches the logits
twice, through the embedding and through the head. SmolLM2 int4-quality, Lee 10 x 512: the whole
table exact instead of 4-bit lowers KL 0.116 -> 0.093, but at 8 bits it would cost 0.86 bits per
weight; its 1,024 most frequent rows exact lower KL to 0.105 for 0.03 bits per weight, the rank
table included, which is better value than any projection at 8 bits (0.004 KL for 0.07). The
int4-quality preset keeps 2,048 rows (82% of its calibration tokens): +10.1% PPL -> +8.5%, KL
0.116 -> 0.107, at the same 4.5 bits per weight.

Preconditions: a constant 2-D float table read only by Gather (axis 0, as data) and by
Transpose(perm [1, 0]) feeding MatMuls as their second input; V > F. The index table is int32
(V < 2^31). Not handled: untied heads (a separate [H, V] weight), tables read any other way (the
reason is recorded and the table is left whole).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.ir.values import new_initializer, remove_unused_initializers
from kiln.passes import calibration as calib
from kiln.passes.base import KilnPass
from kiln.passes.quantization import BITS_HINT, INDEX_HINT
from kiln.passes.registry import register_pass


@register_pass("split-table-rows")
class SplitTableRowsPass(KilnPass):
    uses_calibration = True

    def __init__(self, rows: int = 1024, bits: int = 8):
        super().__init__()
        if rows < 1:
            raise ValueError("rows must be >= 1")
        if bits not in (4, 8):
            raise ValueError("bits (of the frequent rows) must be 4 or 8")
        self.rows, self.bits = rows, bits

    def call(self, model: ir.Model):
        rejected: list[str] = []
        tables = [t for v in list(model.graph.initializers.values()) if (t := _table(v, self.rows, rejected))]
        if not tables:
            return self.result(model, modified=False, stats={"tables": 0}, rejected=rejected)
        feeds = calib.require(self.calibration, "split-table-rows")
        ids: dict[str, list[np.ndarray]] = {g.inputs[1].name: [] for _, gathers, _ in tables for g in gathers}
        for arrays in calib.capture(model, feeds, list(ids)):
            for name, x in arrays.items():
                ids[name].append(np.asarray(x).reshape(-1))
        covered = []
        for table, gathers, heads in tables:
            e = table.const_value.numpy()
            v = e.shape[0]
            read = np.concatenate([a for g in gathers for a in ids[g.inputs[1].name]]).astype(np.int64)
            count = np.bincount(read[(read >= 0) & (read < v)], minlength=v)
            order = np.argsort(-count, kind="stable")  # most frequent first; ties by token id
            rank = np.empty(v, np.int32)
            rank[order] = np.arange(v, dtype=np.int32)
            f = self.rows
            covered.append(float(count[order[:f]].sum() / max(count.sum(), 1)))
            graph = model.graph
            hot = new_initializer(graph, f"{table.name}.hot", e[order[:f]])
            cold = new_initializer(graph, f"{table.name}.cold", e[order[f:]])
            index = new_initializer(graph, f"{table.name}.rank", rank)
            hot.metadata_props[BITS_HINT] = str(self.bits)
            index.metadata_props[INDEX_HINT] = f"{hot.name},{cold.name}"  # the tables it indexes
            for gather in gathers:
                _split_gather(graph, gather, hot, cold, index, f)
            for transpose in heads:
                _split_head(graph, transpose, hot, cold, index)
        remove_unused_initializers(model)
        return self.result(model, modified=True, stats={
            "tables": len(tables), "rows": self.rows, "heads": sum(len(h) for _, _, h in tables),
            # the share of calibration tokens whose rows are hot
            "hot_token_share": round(float(np.mean(covered)), 3)}, rejected=rejected)


def _table(value: ir.Value, rows: int, rejected: list[str]):
    """(table, its Gathers, the Transposes of its head) when `value` is a table this pass splits."""
    tensor = value.const_value
    if tensor is None or len(tensor.shape) != 2 or not tensor.dtype.is_floating_point():
        return None
    gathers, heads = [], []
    for use in value.uses():
        node = use.node
        if node.op_type == "Gather" and use.idx == 0 and node.attributes.get_int("axis", 0) == 0:
            gathers.append(node)
        elif (node.op_type == "Transpose" and list(node.attributes.get_ints("perm", [1, 0])) == [1, 0]
              and all(u.node.op_type == "MatMul" and u.idx == 1 for u in node.outputs[0].uses())):
            heads.append(node)
        else:
            if any(u.node.op_type == "Gather" for u in value.uses()):
                rejected.append(f"{value.name}: read by {node.op_type} (input {use.idx}); left whole")
            return None
    if not gathers:
        return None
    if tensor.shape[0] <= rows:
        rejected.append(f"{value.name}: {tensor.shape[0]} rows, not more than rows = {rows}; left whole")
        return None
    return value, gathers, heads


def _split_gather(graph: ir.Graph, gather: ir.Node, hot: ir.Value, cold: ir.Value, index: ir.Value, f: int) -> None:
    ids = gather.inputs[1]
    base = f"{hot.name}.gather"
    rank = ir.node("Gather", [index, ids], attributes={"axis": 0}, num_outputs=1)
    r = rank.outputs[0]
    is_hot = ir.node("Less", [r, new_initializer(graph, f"{base}.rows", np.int32(f))], num_outputs=1)
    hot_row = ir.node("Min", [r, new_initializer(graph, f"{base}.last", np.int32(f - 1))], num_outputs=1)
    shifted = ir.node("Sub", [r, is_hot.inputs[1]], num_outputs=1)
    cold_row = ir.node("Max", [shifted.outputs[0], new_initializer(graph, f"{base}.zero", np.int32(0))], num_outputs=1)
    nodes = [rank, is_hot, hot_row, shifted, cold_row]
    hot_rows = ir.node("Gather", [hot, hot_row.outputs[0]], attributes={"axis": 0}, num_outputs=1)
    cold_rows = ir.node("Gather", [cold, cold_row.outputs[0]], attributes={"axis": 0}, num_outputs=1)
    mask = ir.node("Unsqueeze", [is_hot.outputs[0], new_initializer(graph, f"{base}.axes", np.array([-1], np.int64))],
                   num_outputs=1)
    where = ir.node("Where", [mask.outputs[0], hot_rows.outputs[0], cold_rows.outputs[0]], num_outputs=1)
    nodes += [hot_rows, cold_rows, mask, where]
    # shapes, for the lowering rules that need the indices' rank (GatherBlockQuantized)
    for node in (rank, hot_row, shifted, cold_row):
        node.outputs[0].dtype, node.outputs[0].shape = ir.DataType.INT32, ids.shape
    is_hot.outputs[0].dtype, is_hot.outputs[0].shape = ir.DataType.BOOL, ids.shape
    out = gather.outputs[0]
    for node in (hot_rows, cold_rows):
        node.outputs[0].dtype, node.outputs[0].shape = out.dtype, out.shape
    for node in nodes:
        graph.insert_before(gather, node)
    _take_over(gather.outputs[0], where.outputs[0])


def _split_head(graph: ir.Graph, transpose: ir.Node, hot: ir.Value, cold: ir.Value, index: ir.Value) -> None:
    for use in list(transpose.outputs[0].uses()):
        matmul = use.node
        x = matmul.inputs[0]
        parts = []
        for table in (hot, cold):
            t = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, num_outputs=1)
            mm = ir.node("MatMul", [x, t.outputs[0]], num_outputs=1)
            parts += [t, mm]
        out = matmul.outputs[0]
        if out.shape is not None:
            for mm, rows in ((parts[1], hot.shape[0]), (parts[3], cold.shape[0])):
                mm.outputs[0].dtype, mm.outputs[0].shape = out.dtype, ir.Shape([*out.shape[:-1], rows])
        concat = ir.node("Concat", [parts[1].outputs[0], parts[3].outputs[0]], attributes={"axis": -1}, num_outputs=1)
        logits = ir.node("Gather", [concat.outputs[0], index], attributes={"axis": -1}, num_outputs=1)
        for node in [*parts, concat, logits]:
            graph.insert_before(matmul, node)
        _take_over(matmul.outputs[0], logits.outputs[0])


def _take_over(old: ir.Value, new: ir.Value) -> None:
    """Point every reader of `old` (and the graph output, keeping its name) at `new`."""
    new.dtype, new.shape = old.dtype, old.shape
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if new.is_graph_output():
        name = old.name
        old.name = f"{name}.unsplit"
        new.name = name

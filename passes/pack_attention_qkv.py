"""Feed GroupQueryAttention the packed Q/K/V projection instead of its three slices.

    q, k, v = Split(qkv[B, S, (H + 2·Hkv)·Dh], [H·Dh, Hkv·Dh, Hkv·Dh], axis=-1)
    GroupQueryAttention(q, k, v, past_key, past_value, ...)
  ->
    GroupQueryAttention(qkv, '', '', past_key, past_value, ...)

GroupQueryAttention takes a packed query when key and value are absent, and slices it itself
(as the onnxruntime-genai builder's graphs do), so the Split and its three outputs go: on
SmolLM2 int4 one node fewer per layer, 30 per decode step of a few microseconds each. The Split
is what `pack-matmuls` leaves after packing the three projections into one MatMul.

Dims: H query heads, Hkv kv heads, Dh head size (from the node's attributes and the split sizes).
Preconditions: the three Split outputs are read by this GroupQueryAttention only, as its query,
key and value, in that order, and the split is along the last axis. Exact (the same numbers).
Not handled: Q/K/V that pass through other ops on the way (per-head norms; biases that
`pack-matmuls` did not pack with their MatMuls), which stay.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kiln.passes.base import KilnPass
from kiln.passes.registry import register_pass


def _packed_input(gqa: ir.Node) -> tuple[ir.Value | None, str]:
    """The Split's input when the three slices can be replaced by it, else (None, reason)."""
    if len(gqa.inputs) < 3 or any(v is None for v in gqa.inputs[:3]):
        return None, "already packed"
    split = gqa.inputs[0].producer()
    if split is None or split.op_type != "Split" or split.domain not in ("", "ai.onnx") or len(split.outputs) != 3:
        return None, "query is not the first output of a three-way Split"
    if list(gqa.inputs[:3]) != list(split.outputs):
        return None, "key and value are not the Split's other outputs"
    if any(len(list(v.uses())) != 1 for v in split.outputs):
        return None, "a slice has other readers"
    packed = split.inputs[0]
    shaped = next((v.shape for v in (packed, *split.outputs) if v.shape is not None), None)
    axis = split.attributes.get_int("axis", 0)
    if axis != -1 and (shaped is None or axis != len(shaped) - 1):
        return None, "the split is not along the last axis"
    sizes = split.inputs[1].const_value if len(split.inputs) > 1 and split.inputs[1] is not None else None
    heads, kv_heads = gqa.attributes.get_int("num_heads", 0), gqa.attributes.get_int("kv_num_heads", 0)
    if sizes is None or heads <= 0 or kv_heads <= 0:
        return None, "split sizes or head counts unknown"
    q, k, v = (int(x) for x in sizes.numpy())
    if q % heads or k != v or q // heads * kv_heads != k:
        return None, f"split sizes {q}/{k}/{v} do not match {heads} query and {kv_heads} kv heads"
    return packed, ""


@register_pass("pack-attention-qkv")
class PackAttentionQkvPass(KilnPass):
    def call(self, model: ir.Model):
        packed, rejected = 0, []
        for node in list(model.graph):
            if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
                continue
            source, reason = _packed_input(node)
            if source is None:
                rejected.append(f"{node.name}: {reason}")
                continue
            node.replace_input_with(0, source)
            node.replace_input_with(1, None)
            node.replace_input_with(2, None)
            packed += 1
        if packed:
            RemoveUnusedNodesPass()(model)
        return self.result(model, modified=packed > 0, stats={"packed": packed}, rejected=rejected)

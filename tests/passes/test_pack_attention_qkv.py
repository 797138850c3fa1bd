"""pack-attention-qkv: GroupQueryAttention reads the packed Q/K/V projection directly (no Split)."""

import numpy as np
import onnx_ir as ir
import pytest

from kiln.ir import summary
from kiln.passes import create_pass
from kiln.passes.numerics import compare, run_ort


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_packed_qkv_feeds_gqa_directly(pipelined, name):
    """After pack-matmuls, GQA reads the packed projection (no Split); exact, and decoding
    through a preallocated cache still equals recompute. tiny-qwen2's Q/K/V carry biases."""
    meta, model, feeds = pipelined(name, ["insert-kv-cache", "pack-matmuls"])
    for n in ["fuse-rms-norm", "fuse-attention", "simplify"]:
        create_pass(n)(model)
    before, splits = run_ort(model, feeds), summary(model).ops.get("Split", 0)
    result = create_pass("pack-attention-qkv")(model)
    assert result.stats["packed"] == meta["num_layers"], result.rejected
    assert summary(model).ops.get("Split", 0) == splits - meta["num_layers"]
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert all(n.inputs[1] is None and n.inputs[2] is None for n in gqa)
    assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-6
    from kiln.passes.kv_layout import decode_consistency

    assert decode_consistency(model, capacity=16) < 1e-5
    assert not create_pass("pack-attention-qkv")(model).modified


def test_qkv_slices_with_other_readers_stay():
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([1, 2, 8]))
    sizes = ir.val("sizes", const_value=ir.tensor(np.array([4, 2, 2], dtype=np.int64)))
    split = ir.node("Split", [x, sizes], attributes={"axis": -1}, num_outputs=3)
    gqa = ir.node("GroupQueryAttention", [*split.outputs], domain="com.microsoft",
                  attributes={"num_heads": 2, "kv_num_heads": 1}, num_outputs=3)
    extra = ir.node("Relu", [split.outputs[1]])
    graph = ir.Graph([x], [gqa.outputs[0], extra.outputs[0]], nodes=[split, gqa, extra], initializers=[sizes],
                     opset_imports={"": 21, "com.microsoft": 1})
    result = create_pass("pack-attention-qkv")(ir.Model(graph, ir_version=10))
    assert not result.modified and "other readers" in result.rejected[0]

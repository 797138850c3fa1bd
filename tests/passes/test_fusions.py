"""ORT fusions: coverage on every layer, exactness, idempotence, and the reason when a site does not fuse."""


import numpy as np
import onnx_ir as ir
import pytest

from kiln.ir import kv_layout, load_model, summary
from kiln.models import sample_inputs
from kiln.passes import create_pass, run_pipeline
from kiln.passes.fuse_attention import FuseAttentionPass
from kiln.passes.numerics import compare, run_ort

FP32 = ["fold-constants", "simplify", "eliminate-common-subexpressions", "fold-constants"]


def _prepared_model(prepared, name, extra=()):
    p = prepared(name)
    model = load_model(p.path)
    feeds = sample_inputs(p.meta, summary(model).inputs)
    run = run_pipeline(model, [create_pass(n) for n in [*FP32, *extra]], feeds, progress=False)
    return p.meta, run.model, run.feeds


def _ops(model):
    return summary(model).ops


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_rms_norm_and_gqa_fuse_on_every_layer(prepared, name):
    meta, model, feeds = _prepared_model(prepared, name, ["insert-kv-cache"])
    layers = meta["num_layers"]
    before = run_ort(model, feeds)
    # The shared-buffer check can fail: the unfused cache concatenates the whole past buffer.
    unfused = {}
    FuseAttentionPass._mark_shared_buffer(model, unfused)
    assert unfused["shared_buffer_check_max_rel"] > 1e-2
    assert kv_layout(model).shared_buffer is False
    rms = create_pass("fuse-rms-norm")(model)
    assert rms.stats["norms_seen"] == rms.stats["rms_fused"] == 2 * layers + 1
    assert rms.stats["skip_fused"] == 2 * layers
    assert not rms.warnings
    att = create_pass("fuse-attention")(model)
    assert att.stats["gqa_fused"] == layers and att.stats["mha_fused"] == 0
    assert att.stats["decode_check_max_rel"] < 1e-5
    assert att.stats["shared_buffer_check_max_rel"] < 1e-5
    assert kv_layout(model).shared_buffer is True
    assert not att.warnings
    ops = _ops(model)
    assert ops["com.microsoft::GroupQueryAttention"] == layers
    assert "Softmax" not in ops
    assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-4
    assert not create_pass("fuse-attention")(model).modified
    assert not create_pass("fuse-rms-norm")(model).modified


def test_bert_attention_becomes_mha_with_skip_layer_norm(prepared):
    meta, model, feeds = _prepared_model(prepared, "tiny-bert")
    before = run_ort(model, feeds)
    ln = create_pass("fuse-layer-norm")(model)
    assert ln.stats["skip_layer_norm_fused"] == ln.stats["residual_norms_seen"] == 2 * meta["num_layers"]
    att = create_pass("fuse-attention")(model)
    assert att.stats["mha_fused"] == meta["num_layers"] and att.stats["gqa_fused"] == 0
    gelu = create_pass("fuse-gelu")(model)
    assert gelu.stats["bias_gelu_fused"] == meta["num_layers"]
    assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-4


def test_attention_without_a_cache_is_not_gqa(prepared):
    meta, model, _ = _prepared_model(prepared, "tiny-llama")
    att = create_pass("fuse-attention")(model)
    assert att.stats["gqa_fused"] == 0 and att.stats["mha_fused"] == meta["num_layers"]


def test_unfusable_norm_is_a_warning_with_the_reason():
    # RMSNorm with a non-constant epsilon: g * (x * 1/sqrt(mean(x^2) + eps_input))
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["B", 4]))
    eps = ir.val("eps", ir.DataType.FLOAT, ir.Shape([]))
    two = ir.val("two", const_value=ir.tensor(np.array(2.0, dtype=np.float32)))
    axes = ir.val("axes", const_value=ir.tensor(np.array([-1], dtype=np.int64)))
    pow_ = ir.node("Pow", [x, two], num_outputs=1)
    mean = ir.node("ReduceMean", [pow_.outputs[0], axes], attributes={"keepdims": 1, "noop_with_empty_axes": 0}, num_outputs=1)
    add = ir.node("Add", [mean.outputs[0], eps], num_outputs=1)
    sqrt = ir.node("Sqrt", [add.outputs[0]], num_outputs=1)
    rec = ir.node("Reciprocal", [sqrt.outputs[0]], num_outputs=1)
    norm = ir.node("Mul", [x, rec.outputs[0]], num_outputs=1)
    gamma = ir.val("gamma", const_value=ir.tensor(np.ones(4, dtype=np.float32)))
    mul = ir.node("Mul", [norm.outputs[0], gamma], num_outputs=1)
    mul.outputs[0].name = "y"
    for n in (pow_, norm, mul):
        n.outputs[0].dtype, n.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(["B", 4])
    for n in (mean, add, sqrt, rec):
        n.outputs[0].dtype, n.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(["B", 1])
    g = ir.Graph([x, eps], [mul.outputs[0]], nodes=[pow_, mean, add, sqrt, rec, norm, mul], initializers=[two, axes, gamma],
                 opset_imports={"": 20}, name="g")
    result = create_pass("fuse-rms-norm")(ir.Model(g, ir_version=10))
    assert not result.modified
    assert result.stats["norms_seen"] == 1 and result.stats["rms_fused"] == 0
    assert result.warnings and result.warnings[0].startswith("RMSNorm fused on 0/1: ")
    assert "epsilon" in result.warnings[0].lower() or "constant" in result.warnings[0].lower(), result.warnings


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_packed_qkv_feeds_gqa_directly(prepared, name):
    """After pack-matmuls, GQA reads the packed projection (no Split); exact, and decoding
    through a preallocated cache still equals recompute. tiny-qwen2's Q/K/V carry biases."""
    meta, model, feeds = _prepared_model(prepared, name, ["insert-kv-cache", "pack-matmuls"])
    for n in ["fuse-rms-norm", "fuse-attention", "simplify"]:
        create_pass(n)(model)
    before, splits = run_ort(model, feeds), _ops(model).get("Split", 0)
    result = create_pass("pack-attention-qkv")(model)
    assert result.stats["packed"] == meta["num_layers"], result.rejected
    assert _ops(model).get("Split", 0) == splits - meta["num_layers"]
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


# Decoder families beyond Llama (built in tests/passes/test_attention_forms.py): what GQA takes, and
# the reason for what it leaves. Decoding is checked past every sliding window (16 tokens).
GQA_FAMILIES = {
    "mistral-sw16": dict(gqa=2, rotary=2),  # window kept in attention_bias
    "falcon-mq": dict(gqa=2, rotary=2, repeats=4),  # one K/V head broadcast by the MatMul
    "gptj": dict(gqa=2, rotary=0),  # interleaved RoPE applied before the head transpose: outside
    "mpt": dict(gqa=2, rotary=0),  # ALiBi [B, H, S, T] as attention_bias
    "gemma2": dict(gqa=2, rotary=0, softcap=2),  # softcap=50 on the op; the alternating window in the bias
    "bloom": dict(gqa=0, reason="per batch·head"),
}


@pytest.mark.parametrize("name", list(GQA_FAMILIES))
def test_decoder_families_fuse_gqa_or_say_why(name):
    from test_attention_forms import cleaned

    from kiln.passes.insert_kv_cache import InsertKVCachePass
    from kiln.passes.kv_layout import decode_consistency

    want = GQA_FAMILIES[name]
    model = cleaned(name)
    InsertKVCachePass()(model)
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 320, size=(2, 40))}
    from kiln.passes.kv_layout import cache_feeds

    feeds = cache_feeds(kv_layout(model), feeds["input_ids"])
    before = run_ort(model, feeds)
    att = create_pass("fuse-attention")(model)
    assert att.stats["gqa_fused"] == want["gqa"], (att.rejected, att.warnings)
    if want["gqa"]:
        assert att.stats["gqa_with_rotary"] == want["rotary"]
        assert att.stats.get("kv_head_repeats_made_explicit", 0) == want.get("repeats", 0)
        assert att.stats.get("gqa_with_softcap", 0) == want.get("softcap", 0)
        assert att.stats["decode_check_max_rel"] < 1e-5
        assert decode_consistency(model, prefill=24, steps=3, pad=0 if want["rotary"] else 3) < 1e-5
    else:
        assert att.warnings and want["reason"] in att.warnings[0], att.warnings
    assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-4
    assert not create_pass("fuse-attention")(model).modified


def test_partial_rotary_stays_outside_gqa_with_a_warning(prepared):
    meta, model, _ = _prepared_model(prepared, "tiny-neox", ["insert-kv-cache"])
    att = create_pass("fuse-attention")(model)
    assert att.stats["gqa_fused"] == meta["num_layers"] and att.stats["gqa_with_rotary"] == 0
    assert all("partial rotary" in r for r in att.rejected), att.rejected
    assert any("RoPE stays outside GroupQueryAttention" in w for w in att.warnings)

"""ORT fusions together, as the ORT lowering runs them: every layer covered, exact, idempotent.
One pass's own behaviour is tested in its file (test_fuse_rms_norm.py, test_fuse_attention.py, ...)."""

import pytest

from kiln.ir import kv_layout, summary
from kiln.passes import create_pass
from kiln.passes.fuse_attention import FuseAttentionPass
from kiln.passes.numerics import compare, run_ort


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_rms_norm_and_gqa_fuse_on_every_layer(pipelined, name):
    meta, model, feeds = pipelined(name, ["insert-kv-cache"])
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
    ops = summary(model).ops
    assert ops["com.microsoft::GroupQueryAttention"] == layers
    assert "Softmax" not in ops
    assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-4
    assert not create_pass("fuse-attention")(model).modified
    assert not create_pass("fuse-rms-norm")(model).modified


def test_bert_attention_becomes_mha_with_skip_layer_norm(pipelined):
    meta, model, feeds = pipelined("tiny-bert")
    before = run_ort(model, feeds)
    ln = create_pass("fuse-layer-norm")(model)
    assert ln.stats["skip_layer_norm_fused"] == ln.stats["residual_norms_seen"] == 2 * meta["num_layers"]
    att = create_pass("fuse-attention")(model)
    assert att.stats["mha_fused"] == meta["num_layers"] and att.stats["gqa_fused"] == 0
    gelu = create_pass("fuse-gelu")(model)
    assert gelu.stats["bias_gelu_fused"] == meta["num_layers"]
    assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-4

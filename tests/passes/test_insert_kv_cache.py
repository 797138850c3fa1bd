
import numpy as np
import onnx_ir as ir
import pytest
from conftest import tiny_graph

from kiln.errors import KilnError
from kiln.ir import kv_layout, load_model, summary
from kiln.models import sample_inputs
from kiln.passes import create_pass, run_pipeline
from kiln.passes.insert_kv_cache import InsertKVCachePass
from kiln.passes.kv_layout import cache_feeds, decode_consistency
from kiln.passes.numerics import compare, run_ort

CLEANUP = ["fold-constants", "simplify", "eliminate-common-subexpressions", "fold-constants"]


# tiny-llama in the fast tier, the other families in `make test` (slow)
@pytest.fixture(params=[n if n == "tiny-llama" else pytest.param(n, marks=pytest.mark.slow) for n in
                        ["tiny-llama", "tiny-gpt2", "tiny-qwen2", "tiny-opt", "tiny-phi3", "tiny-gemma", "tiny-neox"]])
def decoder(request, prepared):
    p = prepared(request.param)
    model = load_model(p.path)
    feeds = sample_inputs(p.meta, summary(model).inputs)
    model = run_pipeline(model, [create_pass(n) for n in CLEANUP], feeds, progress=False).model
    return request.param, p.meta, model, feeds


def test_inserts_a_cache_in_every_layer_and_keeps_outputs(decoder):
    name, meta, model, feeds = decoder
    before = run_ort(model, feeds)
    result = InsertKVCachePass()(model)
    assert result.modified
    layers = meta["num_layers"]
    assert result.stats["kv_layers"] == result.stats["attentions_seen"] == layers
    assert result.stats["positions_replaced"] == 1
    assert result.stats["decode_check_max_rel"] < 1e-5
    assert result.stats["full_check_max_rel"] < 1e-5 and result.stats["full_check_length"] == 48
    layout = kv_layout(model)
    assert layout.num_layers == layers and layout.kv_heads == meta["num_key_value_heads"]
    names = [v.name for v in model.graph.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert f"past_key_values.{layers - 1}.value" in names
    assert [v.name for v in model.graph.outputs][-1] == f"present.{layers - 1}.value"
    after = run_ort(model, cache_feeds(layout, feeds["input_ids"]))
    assert compare(before, after)["max_rel"] < 1e-5


def test_left_padding_gives_the_same_logits_as_no_padding(decoder):
    _, _, model, feeds = decoder
    InsertKVCachePass()(model)
    layout = kv_layout(model)
    ids = feeds["input_ids"][:1, :7]
    plain = run_ort(model, cache_feeds(layout, ids))["logits"][0, -1]
    padded = cache_feeds(layout, np.concatenate([np.zeros((1, 3), dtype=np.int64), ids], axis=1))
    padded["attention_mask"][0, :3] = 0
    padded["position_ids"] = np.maximum(np.cumsum(padded["attention_mask"], axis=1) - 1, 0)
    got = run_ort(model, padded)["logits"][0, -1]
    np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-4)


def test_batch_2_left_padded_long_decode_equals_recompute(decoder):
    _, _, model, _ = decoder
    InsertKVCachePass()(model)
    # 40-token prefill + 4 steps, row 1 left-padded by 6 (and equal to row 0 on its real tokens)
    assert decode_consistency(model, prefill=40, steps=4, pad=6) < 1e-5


def test_static_cache_checks_itself_within_its_length(decoder):
    _, _, model, _ = decoder
    result = InsertKVCachePass(static_length=32)(model)
    assert result.stats["full_check_length"] == 32 and result.stats["full_check_max_rel"] < 1e-5
    assert result.stats["decode_check_max_rel"] < 1e-5


def test_idempotent(decoder):
    _, _, model, _ = decoder
    InsertKVCachePass()(model)
    again = InsertKVCachePass()(model)
    assert not again.modified
    assert again.rejected == ["the model already has a KV cache"]


def test_rejects_a_graph_without_attention():
    # input_ids -> embedding lookup -> per-token output: causal, but nothing to cache
    ids = ir.val("input_ids", ir.DataType.INT64, ir.Shape(["batch", "sequence"]))
    table = ir.val("table", const_value=ir.tensor(np.eye(4, dtype=np.float32)))
    gather = ir.node("Gather", [table, ids], num_outputs=1)
    gather.outputs[0].name = "logits"
    gather.outputs[0].dtype, gather.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(["batch", "sequence", 4])
    g = ir.Graph([ids], [gather.outputs[0]], nodes=[gather], initializers=[table], opset_imports={"": 21}, name="g")
    with pytest.raises(KilnError, match="^pass 'insert-kv-cache': no attention"):
        InsertKVCachePass()(ir.Model(g, ir_version=10))


def test_rejects_a_model_without_input_ids():
    with pytest.raises(KilnError, match="expects exactly one input 'input_ids'"):
        InsertKVCachePass()(tiny_graph())


def test_pipeline_adapts_feeds_after_the_signature_changes(prepared):
    p = prepared("tiny-llama")
    model = load_model(p.path)
    feeds = sample_inputs(p.meta, summary(model).inputs)
    run = run_pipeline(model, [create_pass(n) for n in [*CLEANUP, "insert-kv-cache", "fuse-attention"]], feeds, progress=False)
    assert "past_key_values.0.key" in run.feeds
    kv = run.records[-2]
    assert kv["delta"]["max_rel"] < 1e-5 and kv["delta_total"]["max_rel"] < 1e-5
    assert decode_consistency(run.model) < 1e-5


def test_encoders_are_skipped_with_the_reason_when_optional(prepared):
    p = prepared("tiny-bert")
    model = load_model(p.path)
    result = InsertKVCachePass(only_causal_lm=True)(model)
    assert not result.modified
    assert result.rejected[0].startswith("not a causal LM: expects exactly one input 'input_ids'")
    with pytest.raises(KilnError, match="not a causal LM"):
        InsertKVCachePass()(model)


def test_bidirectional_attention_is_detected_numerically(tmp_path):
    import torch

    import kiln
    from kiln.models.tiny import build

    class PerToken(torch.nn.Module):  # a BERT that looks like an LM from outside
        def __init__(self):
            super().__init__()
            self.bert = build("tiny-bert")

        def forward(self, input_ids):
            return self.bert(input_ids=input_ids).last_hidden_state

    recipe = tmp_path / "kv.toml"
    recipe.write_text('[[passes]]\nname = "insert-kv-cache"\n')
    with pytest.raises(KilnError, match="bidirectional attention"):
        kiln.compile(PerToken().eval(), tmp_path / "out", recipe=recipe, progress=False,
                     example_inputs=(torch.ones(2, 8, dtype=torch.int64),),
                     dynamic_shapes={"input_ids": {0: "batch", 1: "sequence"}})
    assert not (tmp_path / "out").exists()

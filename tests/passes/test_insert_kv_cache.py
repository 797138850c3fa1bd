import json

import numpy as np
import onnx_ir as ir
import pytest

from conftest import tiny_graph
from kiln.errors import KilnError
from kiln.ir import KV_CACHE_METADATA, load_model, summary
from kiln.models import sample_inputs
from kiln.passes import create_pass, run_pipeline
from kiln.passes.insert_kv_cache import InsertKVCachePass
from kiln.passes.kv_layout import cache_feeds, decode_consistency
from kiln.passes.numerics import compare, run_ort

CLEANUP = ["fold-constants", "simplify", "eliminate-common-subexpressions", "fold-constants"]


@pytest.fixture(params=["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
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
    layout = json.loads(model.metadata_props[KV_CACHE_METADATA])
    assert layout["num_layers"] == layers and layout["kv_heads"] == meta["num_key_value_heads"]
    names = [v.name for v in model.graph.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert f"past_key_values.{layers - 1}.value" in names
    assert [v.name for v in model.graph.outputs][-1] == f"present.{layers - 1}.value"
    after = run_ort(model, cache_feeds(layout, feeds["input_ids"]))
    assert compare(before, after)["max_rel"] < 1e-5


def test_left_padding_gives_the_same_logits_as_no_padding(decoder):
    _, _, model, feeds = decoder
    InsertKVCachePass()(model)
    layout = json.loads(model.metadata_props[KV_CACHE_METADATA])
    ids = feeds["input_ids"][:1, :7]
    plain = run_ort(model, cache_feeds(layout, ids))["logits"][0, -1]
    padded = cache_feeds(layout, np.concatenate([np.zeros((1, 3), dtype=np.int64), ids], axis=1))
    padded["attention_mask"][0, :3] = 0
    padded["position_ids"] = np.maximum(np.cumsum(padded["attention_mask"], axis=1) - 1, 0)
    got = run_ort(model, padded)["logits"][0, -1]
    np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-4)


def test_idempotent(decoder):
    _, _, model, _ = decoder
    InsertKVCachePass()(model)
    again = InsertKVCachePass()(model)
    assert not again.modified
    assert again.rejected == ["the model already has a KV cache"]


def test_rejects_a_graph_without_attention():
    model = tiny_graph()
    model.graph.inputs[0].name = "input_ids"
    model.graph.inputs[0].shape = ir.Shape(["batch", "sequence"])
    with pytest.raises(KilnError, match="no attention"):
        InsertKVCachePass()(model)


def test_rejects_a_model_without_input_ids():
    with pytest.raises(KilnError, match="needs an input 'input_ids'"):
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

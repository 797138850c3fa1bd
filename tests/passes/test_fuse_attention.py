"""fuse-attention: attention subgraphs -> ORT's GroupQueryAttention (with a KV cache) or
MultiHeadAttention; coverage across decoder families, and the reason when a site does not fuse."""

import numpy as np
import pytest

from kiln.ir import kv_layout
from kiln.passes import create_pass
from kiln.passes.numerics import compare, run_ort


def test_attention_without_a_cache_is_not_gqa(pipelined):
    meta, model, _ = pipelined("tiny-llama")
    att = create_pass("fuse-attention")(model)
    assert att.stats["gqa_fused"] == 0 and att.stats["mha_fused"] == meta["num_layers"]


# Decoder families beyond Llama (built in tests/passes/test_attention_forms.py): what GQA takes, and
# the reason for what it leaves. Decoding is checked past every sliding window (16 tokens).
GQA_FAMILIES = {
    "mistral-sw16": dict(gqa=2, rotary=2),  # window kept in attention_bias
    # one K/V head, broadcast by the MatMul (eager) or repeated explicitly (as an exporter may write
    # it): either way GQA reads the single cached head
    "falcon-mq": dict(gqa=2, rotary=2, kv_heads=1),
    "gptj": dict(gqa=2, rotary=0),  # interleaved RoPE applied before the head transpose: outside
    "mpt": dict(gqa=2, rotary=0),  # ALiBi [B, H, S, T] as attention_bias
    "gemma2": dict(gqa=2, rotary=0, softcap=2),  # softcap=50 on the op; the alternating window in the bias
    "bloom": dict(gqa=0, reason="per batch·head"),
}


def _heads(value) -> int | None:
    dims = value.shape.dims if value.shape is not None and len(value.shape) == 4 else ()
    return dims[1] if dims and isinstance(dims[1], int) else None


FAST_FAMILIES = ("mistral-sw16", "falcon-mq", "bloom")  # a window, multi-query and a refusal: the fast tier


@pytest.mark.parametrize("name", [n if n in FAST_FAMILIES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in GQA_FAMILIES])
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
    broadcasts = sum(1 for n in model.graph if n.op_type == "MatMul" and _heads(n.inputs[0]) and _heads(n.inputs[1])
                     and _heads(n.inputs[0]) != _heads(n.inputs[1]))
    att = create_pass("fuse-attention")(model)
    assert att.stats["gqa_fused"] == want["gqa"], (att.rejected, att.warnings)
    if want["gqa"]:
        assert att.stats["gqa_with_rotary"] == want["rotary"]
        assert att.stats.get("kv_head_repeats_made_explicit", 0) == broadcasts  # each MatMul that broadcast K/V
        if "kv_heads" in want:
            gqa_nodes = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
            assert [n.attributes["kv_num_heads"].as_int() for n in gqa_nodes] == [want["kv_heads"]] * want["gqa"]
        assert att.stats.get("gqa_with_softcap", 0) == want.get("softcap", 0)
        assert att.stats["decode_check_max_rel"] < 1e-5
        assert decode_consistency(model, prefill=24, steps=3, pad=0 if want["rotary"] else 3) < 1e-5
    else:
        assert att.warnings and want["reason"] in att.warnings[0], att.warnings
    assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-4
    assert not create_pass("fuse-attention")(model).modified


def test_partial_rotary_stays_outside_gqa_with_a_warning(pipelined):
    meta, model, _ = pipelined("tiny-neox", ["insert-kv-cache"])
    att = create_pass("fuse-attention")(model)
    assert att.stats["gqa_fused"] == meta["num_layers"] and att.stats["gqa_with_rotary"] == 0
    assert all("partial rotary" in r for r in att.rejected), att.rejected
    assert any("RoPE stays outside GroupQueryAttention" in w for w in att.warnings)

"""Decoder families whose attention is not plain causal RoPE: each is handled exactly or
refused in one line, never compiled wrong (issue 22).

Tiny random-init models built here from transformers configs (hidden 64, 2 layers, 4
heads, vocab 320, init range 0.2 so greedy argmax has margins), exported through kiln and
cached under $KILN_CACHE. Every rewrite is checked at batch 2 with one row left-padded and
on sequences longer than the sliding windows (16 tokens): greedy tokens of the cached graph
over 36 new tokens must equal transformers' own `generate`.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

from kiln.errors import KilnError
from kiln.ir import kv_layout, load_model
from kiln.passes import create_pass, run_pipeline
from kiln.passes.insert_kv_cache import InsertKVCachePass
from kiln.passes.kv_layout import cache_feeds, decode_consistency
from kiln.passes.numerics import ort_session

V = 320
CLEANUP = ["fold-constants", "simplify", "eliminate-common-subexpressions", "fold-constants"]
IDS = dict(bos_token_id=256, eos_token_id=256, pad_token_id=256)
DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=512, initializer_range=0.2)

FAMILIES = {
    # interleaved ("rotate every two") rotary; RoPE applied in [B, S, H, D] before the head transpose
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, rotary_dim=16,
                                                   n_positions=512, initializer_range=0.2, **IDS)),
    # ALiBi: slope_h * key position added to the scores, batch·heads layout
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=V, hidden_size=64, n_layer=2, n_head=4,
                                                      initializer_range=0.2, **IDS)),
    # sliding window of 16 on every layer
    "mistral-sw16": ("MistralConfig", "MistralForCausalLM", dict(vocab_size=V, num_key_value_heads=2,
                                                                 sliding_window=16, **DECODER, **IDS)),
    # a window of 16 on one layer (use_sliding_window, max_window_layers=1)
    "qwen2-sw16": ("Qwen2Config", "Qwen2ForCausalLM", dict(vocab_size=V, num_key_value_heads=1, use_sliding_window=True,
                                                         sliding_window=16, max_window_layers=1, **DECODER, **IDS)),
    "phi3-sw16": ("Phi3Config", "Phi3ForCausalLM", dict(vocab_size=V, num_key_value_heads=2, sliding_window=16,
                                                       **DECODER, **IDS)),
    # ALiBi in [batch, heads, query, key] layout
    "mpt": ("MptConfig", "MptForCausalLM", dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, max_seq_len=512,
                                                initializer_range=0.2, **IDS)),
    # local attention (window 16) on every other layer, unscaled scores; dims below the position
    # table annotated Min(512, sequence)
    "gpt-neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4,
                                                          max_position_embeddings=512, window_size=16,
                                                          attention_types=[[["global", "local"], 1]],
                                                          initializer_range=0.2, **IDS)),
    # logit softcapping on every layer, a window of 16 on every other layer
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(vocab_size=V, num_key_value_heads=2, head_dim=16,
                                                         sliding_window=16, attn_logit_softcapping=50.0,
                                                         final_logit_softcapping=30.0, **DECODER, **IDS)),
    # multi-query (one K/V head) parallel attention, K/V heads broadcast by the MatMul
    "falcon-mq": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                                            num_attention_heads=4, new_decoder_architecture=False,
                                                            multi_query=True, parallel_attn=True, alibi=False,
                                                            initializer_range=0.2, **IDS)),
}
# a window longer than the first probes (40 and 72 tokens): found by the long probe of the terms alone
FAMILIES["mistral-sw100"] = ("MistralConfig", "MistralForCausalLM", dict(vocab_size=V, num_key_value_heads=2,
                                                                         sliding_window=100, **DECODER, **IDS))
# what the pass must find in each: stats it reports
EXPECTED = {
    "gptj": {"position_reshapes_rebatched": 2},
    "bloom": {"alibi_layers": 2},
    "mistral-sw16": {"sliding_window_layers": 2},
    "qwen2-sw16": {"sliding_window_layers": 1},
    "phi3-sw16": {"sliding_window_layers": 2},
    "mpt": {"alibi_layers": 2},
    "gpt-neo": {"sliding_window_layers": 1},
    "gemma2": {"sliding_window_layers": 1, "softcap_layers": 2},
    "falcon-mq": {},
}


def build(name: str):
    import transformers

    config_cls, model_cls, kwargs = FAMILIES[name]
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


def export(name: str):
    """model.onnx of the family, exported once per config and library versions."""
    from kiln.models import sources
    from kiln.models.cache import atomic_dir, cache_dir
    from kiln.models.export import _versions, export_loaded

    wrap = sources.causal_lm_loaded
    key = hashlib.sha256(json.dumps([FAMILIES[name], _versions()], sort_keys=True, default=str).encode()).hexdigest()[:12]
    final = cache_dir("exports") / f"attn-{name}-{key}"
    if not (final / "model.onnx").is_file():
        with atomic_dir(final) as tmp:
            export_loaded(wrap(build(name), None, {}, {}), tmp)
    return final / "model.onnx"


def cleaned(name: str) -> ir.Model:
    model = load_model(export(name))
    feeds = {"input_ids": np.random.default_rng(0).integers(0, V, size=(2, 12))}
    return run_pipeline(model, [create_pass(n) for n in CLEANUP], feeds, progress=False).model


def greedy_cached(model: ir.Model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy decoding through the cache, the prompts left-padded into one batch."""
    layout = kv_layout(model)
    session = ort_session(model)
    names = [o.name for o in session.get_outputs()]
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts], dtype=np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    feeds = cache_feeds(layout, ids)
    feeds["attention_mask"] = mask
    feeds["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    out = [[] for _ in prompts]
    for _ in range(new_tokens):
        result = dict(zip(names, session.run(names, feeds)))
        nxt = result["logits"][:, -1].argmax(-1)
        for row, t in zip(out, nxt):
            row.append(int(t))
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        feeds = {"input_ids": nxt[:, None].astype(np.int64), "attention_mask": mask,
                 "position_ids": (mask.sum(1, keepdims=True) - 1).astype(np.int64)}
        for i in range(layout.num_layers):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{i}.{kind}"] = result[f"present.{i}.{kind}"]
    return out


def greedy_transformers(hf, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, use_cache=True, pad_token_id=0)
    return out[:, width:].tolist()


# one family (a sliding window) in the fast tier, the others in `make test` (slow)
@pytest.fixture(params=[n if n == "mistral-sw16" else pytest.param(n, marks=pytest.mark.slow)
                        for n in FAMILIES if n != "mistral-sw100"])
def family(request):
    return request.param


def test_the_pass_handles_the_family_exactly(family):
    model = cleaned(family)
    result = InsertKVCachePass()(model)
    stats = result.stats
    assert stats["kv_layers"] == stats["attentions_seen"] == 2
    for key, value in EXPECTED[family].items():
        assert stats[key] == value, (key, stats)
    assert stats["full_check_max_rel"] < 1e-5 and stats["full_check_length"] >= 24
    assert stats["decode_check_max_rel"] < 1e-5
    # past the window, batch 2 with a left-padded row, long prefill and decode
    assert decode_consistency(model, prefill=30, steps=4, pad=5) < 1e-5


def test_greedy_tokens_equal_transformers_generate(family):
    model = cleaned(family)
    InsertKVCachePass()(model)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, size=8).tolist(), rng.integers(0, 256, size=5).tolist()]  # row 1 left-padded
    want = greedy_transformers(build(family), prompts, 36)  # 44 tokens: past every window of 16
    assert greedy_cached(model, prompts, 36) == want


def test_a_window_longer_than_the_first_probes_is_found_and_checked_past():
    model = cleaned("mistral-sw100")
    stats = InsertKVCachePass()(model).stats
    assert stats["sliding_window_layers"] == 2
    assert kv_layout(model).extra["attention"] == [{"window": 100, "alibi": False}] * 2
    assert stats["full_check_length"] == 108 and stats["full_check_max_rel"] < 1e-5
    assert stats["decode_check_max_rel"] < 1e-5


def test_a_misread_window_is_caught_by_the_self_check(monkeypatch):
    import kiln.passes.insert_kv_cache as kv
    from kiln.passes.analysis.attention import MaskForm

    monkeypatch.setattr(kv, "classify_masks", lambda model, atts, *a, **k: [MaskForm() for _ in atts])
    with pytest.raises(KilnError, match=r"^pass 'insert-kv-cache': the cached graph differs from the original on 48 tokens"):
        InsertKVCachePass()(cleaned("mistral-sw16"))


class _RelativeBias(torch.nn.Module):
    """A causal LM whose scores carry a learned [query, key] bias table (not ALiBi)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, 32)
        self.qkv = torch.nn.Linear(32, 96)
        self.bias = torch.nn.Parameter(torch.randn(128, 128))
        self.head = torch.nn.Linear(32, V)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        q, k, v = self.qkv(x).split(32, dim=-1)
        q, k, v = (t.view(t.shape[0], t.shape[1], 2, 16).transpose(1, 2) for t in (q, k, v))
        s = input_ids.shape[1]
        scores = q @ k.transpose(-1, -2) * 0.25 + self.bias[:s, :s]
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        return self.head(out)


def test_an_unknown_bias_is_refused_in_one_line(tmp_path, capfd):
    from kiln.models.export import export_loaded
    from kiln.models.sources import Loaded

    module = _RelativeBias().eval()
    export_loaded(Loaded(module, {"input_ids": torch.zeros(2, 8, dtype=torch.int64)},
                         {"input_ids": {0: "batch", 1: "sequence"}}, {}), tmp_path)
    model = load_model(tmp_path / "model.onnx")
    capfd.readouterr()
    with pytest.raises(KilnError) as err:
        InsertKVCachePass()(model)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("pass 'insert-kv-cache': this attention mask is not supported: attention 0 ")
    assert "neither a mask nor ALiBi" in message
    assert capfd.readouterr().err == ""  # no ORT log line before it

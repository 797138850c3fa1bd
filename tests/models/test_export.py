import numpy as np
import pytest
import torch

from kiln.ir import load_model, summary
from kiln.models import SOURCES, get_source, prepare, sample_inputs
from kiln.models.sources import UnknownModelError
from kiln.passes.numerics import compare, run_ort


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_export_matches_pytorch(prepared, name):
    p = prepared(name)
    model = load_model(p.path)
    s = summary(model)
    feeds = sample_inputs(p.meta, s.inputs)
    # dynamic batch and sequence axes
    assert all(d["shape"] == ["batch", "sequence"] for d in s.inputs)
    ours = run_ort(model, feeds)
    loaded = get_source(name).load()
    with torch.no_grad():
        ref = loaded.module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    (out_name,) = ours
    assert compare({out_name: ref}, ours)["max_rel"] < 1e-5


def test_export_is_cached_by_content(prepared, monkeypatch):
    first = prepared("tiny-llama")
    source = get_source("tiny-llama")
    monkeypatch.setattr(source, "load", lambda: pytest.fail("a cache hit must not load the model"))
    again = prepare(source, progress=False)
    assert again.path == first.path
    assert again.meta["sha256"] == source.fingerprint()


def test_meta_describes_the_model(prepared):
    meta = prepared("tiny-llama").meta
    assert meta["task"] == "causal-lm"
    assert meta["num_layers"] == 2 and meta["num_key_value_heads"] == 2
    assert meta["generation"]["eos_token_ids"] == [256]
    assert prepared("tiny-llama").tokenizer.is_file()


def test_sample_inputs_respect_vocab_and_pad_the_mask():
    feeds = sample_inputs({"vocab_size": 50}, [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "x", "dtype": "float32", "shape": [3]},
    ])
    assert feeds["input_ids"].shape == (2, 12) and feeds["input_ids"].max() < 50
    assert feeds["attention_mask"][0].all() and feeds["attention_mask"][1, -4:].sum() == 0
    assert feeds["x"].shape == (3,)
    again = sample_inputs({"vocab_size": 50}, [{"name": "input_ids", "dtype": "int64", "shape": ["b", "s"]}])
    np.testing.assert_array_equal(again["input_ids"], feeds["input_ids"])  # fixed seed


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UnknownModelError, match="unknown model 'gpt-5'.*minilm-l6"):
        get_source("gpt-5")
    assert {"smollm2-135m", "minilm-l6", "tiny-llama", "tiny-gpt2", "tiny-bert"} <= set(SOURCES)


def test_sample_inputs_use_real_text_when_a_tokenizer_is_given(prepared):
    from kiln.models.export import SAMPLE_TEXT
    from tokenizers import Tokenizer

    p = prepared("tiny-llama")
    feeds = sample_inputs(p.meta, [{"name": "input_ids", "dtype": "int64", "shape": ["b", "s"]}], tokenizer=p.tokenizer)
    text_ids = Tokenizer.from_file(str(p.tokenizer)).encode(SAMPLE_TEXT).ids
    assert feeds["input_ids"][0].tolist() == text_ids[:12]
    assert feeds["input_ids"][1].tolist() == text_ids[5:17]

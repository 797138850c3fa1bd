
import numpy as np
import pytest
from conftest import assert_same_outputs, tiny_graph

from kiln.errors import KilnError
from kiln.ir import is_static, kv_layout
from kiln.passes import create_pass
from kiln.passes.kv_layout import cache_feeds
from kiln.passes.registry import UnknownPassError


def _with_cache(cleaned, static_length: int = 0):
    model = cleaned("tiny-llama")[1]
    return create_pass("insert-kv-cache", {"static_length": static_length})(model).model


def test_growing_cache_becomes_static_and_keeps_outputs(cleaned):
    model = _with_cache(cleaned)
    before = model.clone()
    result = create_pass("specialize-shapes", {"batch": 1, "sequence": 6, "past_sequence": 4})(model)
    assert result.modified and result.stats["dims_fixed"] > 0 and result.stats["nodes_folded"] > 0
    assert all(is_static(v) for v in model.graph.inputs)
    assert [d for d in model.graph.inputs[1].shape] == [1, 10]  # attention_mask: past + sequence
    layout = kv_layout(model)
    ids = np.arange(10, dtype=np.int64)[None] % 300
    feeds = cache_feeds(layout, ids[:, :4])
    feeds.update({"input_ids": ids[:, 4:], "attention_mask": np.ones((1, 10), dtype=np.int64),
                  "position_ids": np.arange(4, 10, dtype=np.int64)[None]})
    for k in [k for k in feeds if k.startswith("past_key_values")]:
        feeds[k] = np.random.default_rng(0).standard_normal((1, 2, 4, 16)).astype(np.float32)
    assert_same_outputs(before, model, feeds)


def test_static_cache_internal_dims_are_not_taken_for_the_sequence(cleaned):
    # insert-kv-cache annotates the fixed-length cache's internals with `total_sequence`;
    # folding shapes from sequence + past would build wrong Reshape targets.
    model = _with_cache(cleaned, static_length=32)
    before = model.clone()
    create_pass("specialize-shapes", {"batch": 1, "sequence": 5})(model)
    layout = kv_layout(model)
    assert_same_outputs(before, model, cache_feeds(layout, np.arange(5, dtype=np.int64)[None]))


def test_an_input_dim_it_does_not_fix_is_an_error():
    with pytest.raises(KilnError, match="input 'x' has a symbolic dim 'N'"):
        create_pass("specialize-shapes")(tiny_graph())


def test_sizes_must_be_positive():
    with pytest.raises(UnknownPassError, match="batch and sequence must be >= 1"):
        create_pass("specialize-shapes", {"sequence": 0})

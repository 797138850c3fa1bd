
import numpy as np
import onnx_ir as ir
import pytest

from kiln.errors import KilnError
from kiln.ir import kv_layout
from kiln.ir.values import param_count
from kiln.passes import create_pass
from kiln.passes.analysis.layers import decoder_layers
from kiln.passes.analysis.linear import weight_of
from kiln.passes.drop_layers import DropLayersPass
from kiln.passes.insert_kv_cache import InsertKVCachePass
from kiln.passes.kv_layout import decode_consistency
from kiln.passes.numerics import compare, run_ort


def _clone(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_dropping_a_layer_is_zeroing_what_it_adds(cleaned, name):
    """Pre-norm: layer i adds attention and MLP outputs to the stream; zero their last
    projections and the stream passes through unchanged, as if the layer were gone."""
    _, model, feeds, _ = cleaned(name)
    reference = _clone(model)
    layers = decoder_layers(reference)
    assert len(layers) == 2 and all(len(layer.sublayers) == 2 for layer in layers)
    for sub in layers[0].sublayers:
        last = [n for n in sub.nodes if weight_of(n) is not None and sub.add in {u.node for o in n.outputs for u in o.uses()}]
        assert len(last) == 1
        last[0].inputs[1].const_value = ir.tensor(np.zeros_like(weight_of(last[0])))
    result = DropLayersPass(drop=[0])(model)
    assert result.stats["layers_after"] == 1 and result.stats["dropped"] == "0"
    assert compare(run_ort(reference, feeds), run_ort(model, feeds))["max_rel"] < 1e-5


def test_block_influence_then_kv_cache_with_fewer_layers(cleaned):
    _, model, _feeds, calib = cleaned("tiny-llama")
    total = param_count(model)
    p = DropLayersPass(layers=1)
    p.calibration = calib
    result = p(model)
    assert result.stats["params_removed"] == total - param_count(model) > 0
    assert "block_influence_dropped" in result.stats
    assert InsertKVCachePass()(model).modified
    assert kv_layout(model).num_layers == 1
    assert decode_consistency(model) < 1e-4


def test_target_params_and_post_norm_encoder(cleaned):
    _, model, feeds, calib = cleaned("tiny-bert")
    layers = decoder_layers(model)
    assert len(layers) == 2 and layers[-1].end is None  # post-norm: the last layer's output is not on the stream
    p = DropLayersPass(target_params=0.8)
    p.calibration = calib
    result = p(model)
    assert result.stats["dropped"] == "0"
    run_ort(model, feeds)


def test_errors(cleaned):
    _, model, _, calib = cleaned("tiny-llama")
    with pytest.raises(KilnError, match="cannot be dropped"):
        DropLayersPass(drop=[5])(model)
    with pytest.raises(KilnError, match="give at most one of target_params, target_mb, layers, drop"):
        create_pass("drop-layers", {"layers": 1, "drop": [0]})
    p = DropLayersPass(layers=3)
    p.calibration = calib
    with pytest.raises(KilnError, match="cannot drop 3"):
        p(model)
    assert not DropLayersPass()(model).modified


def test_must_run_before_the_kv_cache(cleaned):
    _, model, _, _ = cleaned("tiny-llama")
    InsertKVCachePass()(model)
    with pytest.raises(KilnError, match="before insert-kv-cache"):
        DropLayersPass(layers=1)(model)

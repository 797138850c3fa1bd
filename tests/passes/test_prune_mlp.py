
import numpy as np
import onnx_ir as ir
import pytest

from kiln.errors import KilnError
from kiln.ir import kv_layout
from kiln.ir.values import param_count
from kiln.passes import create_pass
from kiln.passes.analysis.linear import weight_of
from kiln.passes.analysis.mlps import find_mlps
from kiln.passes.insert_kv_cache import InsertKVCachePass
from kiln.passes.kv_layout import decode_consistency
from kiln.passes.numerics import compare, run_ort
from kiln.passes.prune_mlp import PruneMLPPass


def _clone(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-bert"])
def test_removing_channels_is_zeroing_their_down_rows(cleaned, name):
    _, model, feeds, _ = cleaned(name)
    reference = _clone(model)
    mlps, _ = find_mlps(model)
    assert len(mlps) == 2  # one per layer: gated (llama, qwen2) and fc1 + GELU with biases (bert)
    keep = np.arange(0, mlps[0].width, 2)
    for m in mlps:
        PruneMLPPass._prune(model.graph, m, keep, None)
    for m in find_mlps(reference)[0]:
        w = weight_of(m.down).copy()
        w[np.setdiff1d(np.arange(m.width), keep)] = 0
        m.down.inputs[1].const_value = ir.tensor(w)
    delta = compare(run_ort(reference, feeds), run_ort(model, feeds))
    assert delta["max_rel"] < 1e-5, delta
    assert [m.width for m in find_mlps(model)[0]] == [len(keep)] * 2


def test_ratio_then_kv_cache_and_decode(cleaned):
    _, model, _feeds, calib = cleaned("tiny-llama")
    p = PruneMLPPass(ratio=0.25)
    p.calibration = calib
    result = p(model)
    assert result.stats["mlps_pruned"] == 2 and result.stats["width_max"] == 96
    assert result.stats["params_removed"] == 2 * 32 * (64 * 3)
    assert InsertKVCachePass()(model).modified
    assert kv_layout(model).num_layers == 2
    assert decode_consistency(model) < 1e-4


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_target_params_is_met(cleaned, allocation):
    _, model, _feeds, calib = cleaned("tiny-llama")
    total = param_count(model)
    p = PruneMLPPass(target_params=0.9, allocation=allocation)
    p.calibration = calib
    result = p(model)
    assert 0.85 <= param_count(model) / total <= 0.9, result.stats


def test_refit_reduces_the_error(cleaned):
    kl = {}
    for refit in (False, True):
        _, model, feeds, calib = cleaned("tiny-llama")
        before = run_ort(model, feeds)
        p = PruneMLPPass(ratio=0.5, refit=refit)
        p.calibration = calib + [feeds]
        p(model)
        kl[refit] = compare(before, run_ort(model, feeds))["kl"]
    assert kl[True] < kl[False]


def test_nothing_to_prune_and_errors(cleaned):
    _, model, _, calib = cleaned("tiny-llama")
    assert not PruneMLPPass()(model).modified
    with pytest.raises(KilnError, match="ratio must be in"):
        create_pass("prune-mlp", {"ratio": 1.5})
    with pytest.raises(KilnError, match="allocation must be"):
        create_pass("prune-mlp", {"ratio": 0.5, "allocation": "random"})
    p = PruneMLPPass(target_params=0.2)
    p.calibration = calib
    with pytest.raises(KilnError, match="cannot remove"):
        p(model)

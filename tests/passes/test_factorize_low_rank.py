import numpy as np
import onnx_ir as ir
import pytest
from conftest import assert_same_outputs

from kiln.errors import KilnError
from kiln.ir.values import param_count
from kiln.passes import create_pass
from kiln.passes.calibration import CalibrationError
from kiln.passes.factorize_low_rank import FactorizeLowRankPass
from kiln.passes.insert_kv_cache import InsertKVCachePass
from kiln.passes.kv_layout import decode_consistency
from kiln.passes.numerics import compare, run_ort


def _linear(w: np.ndarray) -> ir.Model:
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["N", w.shape[0]]))
    wv = ir.val("W", const_value=ir.tensor(w.astype(np.float32)))
    mm = ir.node("MatMul", [x, wv], num_outputs=1)
    mm.outputs[0].name, mm.outputs[0].dtype, mm.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape(["N", w.shape[1]])
    g = ir.Graph([x], [mm.outputs[0]], nodes=[mm], initializers=[wv], opset_imports={"": 21}, name="g")
    return ir.Model(g, ir_version=10)


def _clone(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


@pytest.mark.parametrize("aware", [False, True])
def test_a_low_rank_weight_is_factored_exactly(aware):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 4)) @ rng.standard_normal((4, 96))
    model = _linear(w)
    before = _clone(model)
    p = FactorizeLowRankPass(energy=1.0, rank_multiple=1, activation_aware=aware, min_elements=1, include_lm_head=True)
    p.calibration = [{"x": rng.standard_normal((128, 64)).astype(np.float32)}]
    result = p(model)
    assert result.stats["layers_factored"] == 1 and result.stats["rank_max"] == 4
    assert result.stats["params_after"] == 4 * (64 + 96)
    assert_same_outputs(before, model, {"x": rng.standard_normal((3, 64)).astype(np.float32)}, rtol=1e-5)


def test_activation_aware_beats_plain_svd_on_correlated_inputs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64))
    mix = rng.standard_normal((64, 64)) * np.logspace(0, -3, 64)[None]  # strongly anisotropic activations
    x = (rng.standard_normal((512, 64)) @ mix.T).astype(np.float32)
    errors = {}
    for aware in (False, True):
        model = _linear(w)
        p = FactorizeLowRankPass(rank=16, activation_aware=aware, min_elements=1, include_lm_head=True)
        p.calibration = [{"x": x}]
        p(model)
        y = run_ort(model, {"x": x})["y"]
        errors[aware] = np.linalg.norm(y - x @ w) / np.linalg.norm(x @ w)
    assert errors[True] < 0.5 * errors[False]


def test_target_params_then_kv_cache_and_decode(cleaned):
    kls = {}
    for aware in (False, True):
        _meta, model, feeds, calib = cleaned("tiny-llama")
        total = param_count(model)
        before = run_ort(model, feeds)
        p = FactorizeLowRankPass(target_params=0.95, min_elements=1, rank_multiple=4, activation_aware=aware)
        p.calibration = calib
        result = p(model)
        kept = result.stats["params_after"] / total
        assert 0.90 <= kept <= 0.95, result.stats
        assert result.stats["params_removed"] == total - param_count(model)
        kls[aware] = compare(before, run_ort(model, feeds))["kl"]
        assert InsertKVCachePass()(model).modified
        assert decode_consistency(model) < 1e-4
    assert kls[True] < kls[False]  # whitening by the activations loses less at the same size


def test_never_factors_where_it_would_not_save():
    model = _linear(np.random.default_rng(0).standard_normal((64, 64)))
    p = FactorizeLowRankPass(rank=40, activation_aware=False, min_elements=1, include_lm_head=True)  # break-even is 32
    result = p(model)
    assert not result.modified and "kept dense" in result.rejected[0]


def test_invalid_parameters_and_missing_calibration():
    with pytest.raises(KilnError, match="exactly one of"):
        create_pass("factorize-low-rank", {"energy": 0.9, "rank": 8})
    with pytest.raises(KilnError, match="target_params must be in"):
        create_pass("factorize-low-rank", {"target_params": 1.5})
    with pytest.raises(KilnError, match="metric must be one of"):
        create_pass("factorize-low-rank", {"rank": 8, "metric": "bleu"})
    with pytest.raises(CalibrationError, match="needs calibration data"):
        FactorizeLowRankPass(rank=8, min_elements=1, include_lm_head=True)(_linear(np.ones((64, 64))))
    model = _linear(np.random.default_rng(0).standard_normal((64, 64)))
    with pytest.raises(KilnError, match="cannot reach"):
        FactorizeLowRankPass(target_params=0.05, activation_aware=False, min_elements=1, include_lm_head=True)(model)


def test_embedding_tables_of_an_encoder(cleaned):
    _, model, feeds, calib = cleaned("tiny-bert")
    total = param_count(model)
    before = run_ort(model, feeds)
    p = FactorizeLowRankPass(target_params=0.8, include_embeddings=True, min_elements=1, metric="cosine", budget=0.0)
    p.calibration = calib
    result = p(model)
    assert result.stats["embeddings_factored"] >= 1
    assert param_count(model) / total <= 0.8
    assert compare(before, run_ort(model, feeds))["cosine"] > 0.5


def test_a_tied_table_is_left_alone():
    ids = ir.val("ids", ir.DataType.INT64, ir.Shape(["N"]))
    table = ir.val("E", const_value=ir.tensor(np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)))
    gather = ir.node("Gather", [table, ids], attributes={"axis": 0}, num_outputs=1)
    transpose = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, num_outputs=1)
    head = ir.node("MatMul", [gather.outputs[0], transpose.outputs[0]], num_outputs=1)
    head.outputs[0].name, head.outputs[0].dtype = "logits", ir.DataType.FLOAT
    g = ir.Graph([ids], [head.outputs[0]], nodes=[gather, transpose, head], initializers=[table],
                 opset_imports={"": 21}, name="tied")
    result = FactorizeLowRankPass(rank=8, include_embeddings=True, activation_aware=False)(ir.Model(g, ir_version=10))
    assert not result.modified
    assert any("tied LM head" in r for r in result.rejected)


def test_centering_adds_the_mean_correcting_bias_and_stays_exact():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 4)) @ rng.standard_normal((4, 96))
    model = _linear(w)
    before = _clone(model)
    p = FactorizeLowRankPass(energy=1.0, rank_multiple=1, center=True, min_elements=1, include_lm_head=True)
    p.calibration = [{"x": (rng.standard_normal((128, 64)) + 3.0).astype(np.float32)}]
    result = p(model)
    assert result.stats["params_after"] == 4 * (64 + 96) + 96
    assert [n.op_type for n in model.graph] == ["MatMul", "MatMul", "Add"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert_same_outputs(before, model, {"x": rng.standard_normal((3, 64)).astype(np.float32)}, rtol=1e-5)


def test_lagrange_allocation_meets_the_target(cleaned):
    _, model, _, calib = cleaned("tiny-llama")
    total = param_count(model)
    p = FactorizeLowRankPass(target_params=0.9, allocation="lagrange", min_elements=1, rank_multiple=4)
    p.calibration = calib
    p(model)
    assert 0.85 <= param_count(model) / total <= 0.9

"""smooth-activations (SmoothQuant): exact in fp32, folds into pre-norms, scales at run time
elsewhere, and evens out the activation ranges it was calibrated on."""

import numpy as np
import pytest

from kiln.ir import load_model, summary, verify
from kiln.models import sample_inputs
from kiln.passes import create_pass, run_pipeline
from kiln.passes.calibration import CalibrationError, collect
from kiln.passes.numerics import compare, run_ort
from kiln.passes.smooth_activations import SmoothActivationsPass


def _model(prepared, name):
    p = prepared(name)
    model = load_model(p.path)
    feeds = sample_inputs(p.meta, summary(model).inputs)
    run = run_pipeline(model, [create_pass(n) for n in ["fold-constants", "simplify", "fold-constants"]], feeds,
                       progress=False)
    rng = np.random.default_rng(5)
    calibration = [{**feeds, "input_ids": rng.integers(0, 256, size=feeds["input_ids"].shape)} for _ in range(2)]
    return run.model, feeds, calibration


@pytest.mark.parametrize("name, folded", [("tiny-llama", True), ("tiny-bert", False)])
def test_smoothing_is_exact_and_evens_out_activations(prepared, name, folded):
    model, feeds, calibration = _model(prepared, name)
    before = run_ort(model, feeds)
    p = SmoothActivationsPass(alpha=0.5)
    p.calibration = calibration
    result = p(model)
    verify(model)
    assert result.modified and result.stats["sites"] > 0
    # pre-norm decoders fold 1/s into the norm weights; post-norm encoders need a Mul
    assert (result.stats["folded_into_norms"] > 0) == folded
    assert (result.stats["runtime_scales"] < result.stats["sites"]) == folded
    assert result.stats["activation_outlier_ratio_after"] < result.stats["activation_outlier_ratio_before"]
    assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-4


def test_gated_mlp_folds_into_the_up_projection_and_runtime_scales_can_be_skipped(prepared):
    """SwiGLU's down-projection input folds into the up weights (tiny-llama: one per layer, also
    after gate/up are packed); runtime_scales=False leaves the attention outputs unsmoothed: no Mul."""
    layers = 2
    for runtime_scales in (True, False):
        model, feeds, calibration = _model(prepared, "tiny-llama")
        run_pipeline(model, [create_pass("pack-matmuls")], feeds, progress=False)
        before, muls = run_ort(model, feeds), sum(n.op_type == "Mul" for n in model.graph)
        p = SmoothActivationsPass(runtime_scales=runtime_scales)
        p.calibration = calibration
        result = p(model)
        verify(model)
        assert result.stats["folded_into_gates"] == layers
        assert result.stats["runtime_scales"] == (layers if runtime_scales else 0)
        assert sum(n.op_type == "Mul" for n in model.graph) == muls + result.stats["runtime_scales"]
        assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-4


def test_smoothing_needs_calibration(prepared):
    model, _, _ = _model(prepared, "tiny-llama")
    with pytest.raises(CalibrationError):
        SmoothActivationsPass()(model)


def test_invalid_alpha():
    with pytest.raises(ValueError, match="alpha"):
        SmoothActivationsPass(alpha=1.5)


def test_collect_statistics_match_numpy(prepared):
    model, feeds, calibration = _model(prepared, "tiny-llama")
    name = next(n for n in model.graph if n.op_type == "MatMul").inputs[0].name
    stats = collect(model, calibration, [name], gram=[name])[name]
    from kiln.passes.calibration import capture

    rows = np.concatenate([a[name].reshape(-1, a[name].shape[-1]) for a in capture(model, calibration, [name])])
    assert stats.rows == rows.shape[0]
    np.testing.assert_allclose(stats.abs_max, np.abs(rows).max(0), rtol=1e-6)
    np.testing.assert_allclose(stats.gram, rows.T.astype(np.float64) @ rows, rtol=1e-5, atol=1e-4)

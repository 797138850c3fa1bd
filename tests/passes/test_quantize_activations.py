"""quantize-activations: static uint8 QDQ on MatMul inputs from calibrated ranges (minmax,
percentile), per-axis int8 weights, idempotent, and every error path."""

import numpy as np
import pytest

from kiln.ir import verify
from kiln.passes import create_pass
from kiln.passes.calibration import CalibrationError, capture
from kiln.passes.numerics import compare, run_ort
from kiln.passes.quantize_activations import QuantizeActivationsPass, _Range, unsigned_grid


def _quantized_weights(cleaned, name="tiny-llama"):
    _, model, feeds, calib = cleaned(name)
    create_pass("quantize-weights", {"bits": 8, "block_size": 0, "min_elements": 256})(model)
    return model, feeds, calib


def _pass(calib, **params) -> QuantizeActivationsPass:
    p = QuantizeActivationsPass(**params)
    p.calibration = calib
    return p


def _ops(model, op):
    return [n for n in model.graph if n.op_type == op]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_every_matmul_reads_quantized_activations_and_weights(cleaned, name):
    model, feeds, calib = _quantized_weights(cleaned, name)
    before = run_ort(model, feeds)
    result = _pass(calib)(model)
    verify(model)
    assert result.modified and result.stats["activations_quantized"] > 0
    for node in _ops(model, "MatMul"):
        for value in node.inputs:  # each input is dequantized: an activation directly, a weight maybe transposed
            producer = value.producer()
            while producer is not None and producer.op_type in ("Transpose", "Reshape"):
                producer = producer.inputs[0].producer()
            assert producer is not None and producer.op_type == "DequantizeLinear", node.name
    assert len(_ops(model, "QuantizeLinear")) == result.stats["activations_quantized"]
    # per-channel weights are in the per-axis form: 1-D scales, no block_size
    weights = [n for n in _ops(model, "DequantizeLinear") if n.inputs[0].const_value is not None]
    assert weights and result.stats["weights_per_axis"] == len(weights)
    assert all("block_size" not in n.attributes and len(n.inputs[1].const_value.shape) == 1 for n in weights)
    assert compare(before, run_ort(model, feeds))["kl"] < 0.05
    assert not _pass(calib)(model).modified  # a second run finds everything quantized


def test_minmax_scales_cover_the_calibration_range(cleaned):
    model, _, calib = _quantized_weights(cleaned)
    x = next(n for n in model.graph if n.op_type == "MatMul").inputs[0]
    observed = np.concatenate([a[x.name].ravel() for a in capture(model, calib, [x.name])])
    _pass(calib, method="minmax")(model)
    q = next(n for n in _ops(model, "QuantizeLinear") if n.inputs[0] is x)
    scale, zero = q.inputs[1].const_value.numpy(), q.inputs[2].const_value.numpy()
    lo, hi = min(observed.min(), 0), max(observed.max(), 0)
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert zero == round(-lo / scale)
    assert q.inputs[2].const_value.dtype.name == "UINT8"


def test_percentile_clips_outliers_and_narrows_the_grid(cleaned):
    model, _, calib = _quantized_weights(cleaned)
    minmax = model.clone()
    result = _pass(calib, method="percentile", percentile=99.0)(model)
    _pass(calib, method="minmax")(minmax)
    assert result.stats["clipped"] == result.stats["activations_quantized"]

    def scales(m):
        return np.array([float(n.inputs[1].const_value.numpy()) for n in _ops(m, "QuantizeLinear")])

    assert np.all(scales(model) <= scales(minmax)) and np.any(scales(model) < scales(minmax))


def test_histogram_percentile_matches_numpy_as_the_range_grows():
    rng = np.random.default_rng(0)
    r = _Range(histogram=True)
    chunks = [(rng.standard_normal(20000) * s).astype(np.float32) for s in (0.1, 1.0, 7.0)]  # the edge doubles twice
    for c in chunks:
        r.add(c)
    values = np.concatenate(chunks)
    lo, hi = r.bounds(99.0)
    expected = np.percentile(np.abs(values), 99.0)
    assert hi == pytest.approx(expected, abs=2 * r.edge / 4096)
    assert lo == pytest.approx(-expected, abs=2 * r.edge / 4096)
    assert r.bounds(None) == (values.min(), values.max())
    assert r.bounds(100.0) == pytest.approx((values.min(), values.max()), abs=r.edge / 4096)


def test_unsigned_grid_keeps_zero_exact():
    scale, zero = unsigned_grid(0.5, 2.0)  # widened to [0, 2]
    assert scale == pytest.approx(2 / 255) and zero == 0
    scale, zero = unsigned_grid(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zero == 64  # -1 sits on level 0: round(1 / s)
    assert unsigned_grid(0.0, 0.0) == (1.0, 0)
    scale, zero = unsigned_grid(-1.0, 3.0, bits=16)
    assert scale == pytest.approx(4 / 65535) and zero == round(65535 / 4) and zero.dtype == np.uint16


def test_attention_false_leaves_activation_products_in_float(cleaned):
    model, _, calib = _quantized_weights(cleaned)
    both = model.clone()
    _pass(calib, attention=False)(model)
    _pass(calib)(both)
    assert 0 < len(_ops(model, "QuantizeLinear")) < len(_ops(both, "QuantizeLinear"))


def test_float_weights_are_reported(cleaned):
    _, model, _, calib = cleaned("tiny-llama")
    result = _pass(calib)(model)
    assert any("float weight" in r for r in result.rejected)


def test_needs_calibration(cleaned):
    model, _, _ = _quantized_weights(cleaned)
    with pytest.raises(CalibrationError, match="quantize-activations needs calibration"):
        QuantizeActivationsPass()(model)


@pytest.mark.parametrize("params, fragment", [({"method": "kl"}, "method"), ({"percentile": 30}, "percentile"),
                                              ({"bits": 4}, "bits"),
                                              ({"metric": "bleu"}, "metric")])
def test_invalid_parameters(params, fragment):
    with pytest.raises(ValueError, match=fragment):
        QuantizeActivationsPass(**params)


def test_16_bit_activations_are_closer_than_8(cleaned):
    model, feeds, calib = _quantized_weights(cleaned)
    wide = model.clone()
    reference = run_ort(model, feeds)
    _pass(calib, bits=8)(model)
    _pass(calib, bits=16)(wide)
    assert {n.outputs[0].dtype.name for n in _ops(wide, "QuantizeLinear")} == {"UINT16"}
    assert compare(reference, run_ort(wide, feeds))["kl"] < compare(reference, run_ort(model, feeds))["kl"]

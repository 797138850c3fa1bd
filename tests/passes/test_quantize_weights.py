import numpy as np
import onnx_ir as ir
import pytest

from conftest import tiny_graph
from kiln.ir import load_model, summary, verify
from kiln.models import sample_inputs
from kiln.passes import create_pass, run_pipeline
from kiln.passes.lower_matmul_nbits import LowerMatMulNBitsPass
from kiln.passes.numerics import compare, run_ort
from kiln.passes.quantize_weights import QuantizeWeightsPass, dequantize, quantize_rtn


@pytest.mark.parametrize("bits, block, symmetric", [(4, 32, True), (4, 64, False), (8, 0, True), (8, 32, False)])
def test_rtn_error_is_within_half_a_step(bits, block, symmetric):
    w = np.random.default_rng(0).standard_normal((100, 24)).astype(np.float32)  # K not a multiple of 32
    q, scale, zero = quantize_rtn(w, bits, block, symmetric)
    err = np.abs(dequantize(q, scale, zero, block) - w)
    step = np.repeat(scale, block or 100, axis=0)[:100]
    assert np.all(err <= step / 2 + 1e-6)
    assert (zero is None) == symmetric


def _llama(prepared):
    p = prepared("tiny-llama")
    model = load_model(p.path)
    feeds = sample_inputs(p.meta, summary(model).inputs)
    run = run_pipeline(model, [create_pass(n) for n in ["fold-constants", "simplify", "eliminate-common-subexpressions",
                                                         "fold-constants", "insert-kv-cache"]], feeds, progress=False)
    return run.model, run.feeds


def test_quantizes_every_projection_and_the_tied_head(prepared):
    model, feeds = _llama(prepared)
    result = QuantizeWeightsPass(bits=4, block_size=16, min_elements=0)(model)
    verify(model)
    # 2 layers x (q, k, v, o, gate, up, down) + the tied LM head
    assert result.stats["matmuls_quantized"] == 15
    assert result.stats["weight_mb_after"] < result.stats["weight_mb_before"] / 5
    assert model.opset_imports[""] == 21
    ops = summary(model).ops
    assert ops["DequantizeLinear"] == 15
    assert not QuantizeWeightsPass(bits=4, block_size=16, min_elements=0)(model).modified  # idempotent


def test_lm_head_can_stay_fp32(prepared):
    model, _ = _llama(prepared)
    result = QuantizeWeightsPass(include_lm_head=False, block_size=16, min_elements=0)(model)
    assert result.stats["matmuls_quantized"] == 14
    assert any("LM head left in fp32" in r for r in result.rejected)


def test_lowering_to_matmul_nbits_is_exact(prepared):
    model, feeds = _llama(prepared)
    QuantizeWeightsPass(bits=4, block_size=16, min_elements=0, symmetric=False)(model)
    before = run_ort(model, feeds)
    result = LowerMatMulNBitsPass()(model)
    assert result.stats["lowered"] == result.stats["quantized_matmuls_seen"] == 15
    assert summary(model).ops["com.microsoft::MatMulNBits"] == 15
    assert "DequantizeLinear" not in summary(model).ops
    assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-4
    assert not LowerMatMulNBitsPass()(model).modified


@pytest.mark.parametrize("bits, symmetric", [(4, True), (8, True), (8, False)])
def test_lowering_packs_every_format(bits, symmetric):
    model = tiny_graph()  # x[N, 4] @ W[4, 3]: too small for a block; use a wider graph
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["N", 40]))
    w = ir.val("W", const_value=ir.tensor(np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)))
    mm = ir.node("MatMul", [x, w], num_outputs=1)
    mm.outputs[0].name, mm.outputs[0].dtype, mm.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape(["N", 8])
    model = ir.Model(ir.Graph([x], [mm.outputs[0]], nodes=[mm], initializers=[w], opset_imports={"": 21}, name="g"),
                     ir_version=10)
    QuantizeWeightsPass(bits=bits, block_size=16, symmetric=symmetric, min_elements=0)(model)
    feeds = {"x": np.random.default_rng(2).standard_normal((3, 40)).astype(np.float32)}
    before = run_ort(model, feeds)
    assert LowerMatMulNBitsPass()(model).stats["lowered"] == 1
    assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-5


def test_per_channel_weights_stay_qdq_with_a_reason(prepared):
    model, _ = _llama(prepared)
    QuantizeWeightsPass(bits=8, block_size=0, min_elements=0)(model)
    result = LowerMatMulNBitsPass()(model)
    assert result.stats["lowered"] == 0
    assert result.warnings and "per-channel scales stay QDQ" in result.warnings[0]


def test_invalid_parameters():
    with pytest.raises(ValueError, match="bits"):
        QuantizeWeightsPass(bits=3)
    with pytest.raises(ValueError, match="block_size"):
        QuantizeWeightsPass(block_size=24)

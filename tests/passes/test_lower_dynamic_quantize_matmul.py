"""lower-dynamic-quantize-matmul: per-channel int8 weights -> ORT's DynamicQuantizeMatMul."""

import numpy as np
import onnx_ir as ir
import pytest
from _helpers import GATHER_FEEDS, gather_matmul_model

from kiln.ir import summary, verify
from kiln.passes.lower_dynamic_quantize_matmul import LowerDynamicQuantizeMatMulPass
from kiln.passes.lower_matmul_nbits import LowerMatMulNBitsPass
from kiln.passes.numerics import compare, run_ort
from kiln.passes.quantize_weights import QuantizeWeightsPass


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_int8_lowers_to_dynamic_quantize_matmul(tied, symmetric):
    model = gather_matmul_model(tied=tied)
    QuantizeWeightsPass(bits=8, block_size=0, symmetric=symmetric, min_elements=0)(model)
    qdq = run_ort(model, GATHER_FEEDS)
    assert LowerMatMulNBitsPass()(model).stats["lowered"] == 0  # K = 40: one block of 40 is not for MatMulNBits
    result = LowerDynamicQuantizeMatMulPass()(model)
    verify(model)
    assert result.stats == {"quantized_matmuls_seen": 1, "lowered": 1}
    assert summary(model).ops["com.microsoft::DynamicQuantizeMatMul"] == 1
    delta = compare(qdq, run_ort(model, GATHER_FEEDS))
    assert delta["cosine"] > 0.999 and 0 < delta["max_rel"] < 0.05  # activations rounded to 8 bits
    assert not LowerDynamicQuantizeMatMulPass()(model).modified


@pytest.mark.parametrize("bits, stored", [(8, ir.DataType.UINT8), (7, ir.DataType.INT8)])
def test_weights_within_seven_bits_keep_the_signed_kernel(bits, stored):
    """Full-range int8 weights move to uint8 (AVX2's u8·s8 pair sums would overflow); 7-bit ones stay int8."""
    model = gather_matmul_model(k=256, n=64)
    QuantizeWeightsPass(bits=bits, block_size=0, min_elements=0)(model)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    q = dq.inputs[0].const_value.numpy()
    assert q.dtype == np.int8 and (q.min() < -64 if bits == 8 else -64 <= q.min() <= q.max() <= 63)
    qdq = run_ort(model, GATHER_FEEDS)
    LowerDynamicQuantizeMatMulPass()(model)
    node = next(n for n in model.graph if n.op_type == "DynamicQuantizeMatMul")
    assert node.inputs[1].const_value.dtype == stored
    assert compare(qdq, run_ort(model, GATHER_FEEDS))["cosine"] > 0.999


def test_blocked_weights_are_left_to_matmul_nbits():
    model = gather_matmul_model(k=64)
    QuantizeWeightsPass(bits=8, block_size=32, min_elements=0)(model)
    result = LowerDynamicQuantizeMatMulPass()(model)
    assert result.stats["lowered"] == 0 and any("blocked weights" in r for r in result.rejected)

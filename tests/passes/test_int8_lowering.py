"""lower-dynamic-quantize-matmul (per-channel int8 -> DynamicQuantizeMatMul) and
gather-quantized-rows (dequantize only the rows a Gather reads)."""

import numpy as np
import onnx_ir as ir
import pytest

from kiln.ir import summary, verify
from kiln.passes.gather_quantized_rows import GatherQuantizedRowsPass
from kiln.passes.lower_dynamic_quantize_matmul import LowerDynamicQuantizeMatMulPass
from kiln.passes.lower_matmul_nbits import LowerMatMulNBitsPass
from kiln.passes.numerics import compare, run_ort
from kiln.passes.quantize_weights import QuantizeWeightsPass


def _model(k=40, n=24, vocab=50, tied=False) -> ir.Model:
    """y = Gather(E, ids) @ W (or @ Transpose(E) when tied); K = 40 is not a power of two."""
    rng = np.random.default_rng(0)
    ids = ir.val("ids", ir.DataType.INT64, ir.Shape(["B", "S"]))
    table = ir.val("E", const_value=ir.tensor(rng.standard_normal((vocab, k)).astype(np.float32)))
    gather = ir.node("Gather", [table, ids], num_outputs=1)
    nodes, inits = [gather], [table]
    if tied:
        t = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, num_outputs=1)
        nodes.append(t)
        weight, n = t.outputs[0], vocab
    else:
        weight = ir.val("W", const_value=ir.tensor(rng.standard_normal((k, n)).astype(np.float32)))
        inits.append(weight)
    mm = ir.node("MatMul", [gather.outputs[0], weight], num_outputs=1)
    mm.outputs[0].name, mm.outputs[0].dtype, mm.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape(["B", "S", n])
    nodes.append(mm)
    return ir.Model(ir.Graph([ids], [mm.outputs[0]], nodes=nodes, initializers=inits, opset_imports={"": 21}, name="g"),
                    ir_version=10)


FEEDS = {"ids": np.array([[1, 2, 3, 49], [0, 7, 7, 8]], dtype=np.int64)}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_int8_lowers_to_dynamic_quantize_matmul(tied, symmetric):
    model = _model(tied=tied)
    QuantizeWeightsPass(bits=8, block_size=0, symmetric=symmetric, min_elements=0)(model)
    qdq = run_ort(model, FEEDS)
    assert LowerMatMulNBitsPass()(model).stats["lowered"] == 0  # K = 40: one block of 40 is not for MatMulNBits
    result = LowerDynamicQuantizeMatMulPass()(model)
    verify(model)
    assert result.stats == {"quantized_matmuls_seen": 1, "lowered": 1}
    assert summary(model).ops["com.microsoft::DynamicQuantizeMatMul"] == 1
    delta = compare(qdq, run_ort(model, FEEDS))
    assert delta["cosine"] > 0.999 and 0 < delta["max_rel"] < 0.05  # activations rounded to 8 bits
    assert not LowerDynamicQuantizeMatMulPass()(model).modified


@pytest.mark.parametrize("bits, stored", [(8, ir.DataType.UINT8), (7, ir.DataType.INT8)])
def test_weights_within_seven_bits_keep_the_signed_kernel(bits, stored):
    """Full-range int8 weights move to uint8 (AVX2's u8·s8 pair sums would overflow); 7-bit ones stay int8."""
    model = _model(k=256, n=64)
    QuantizeWeightsPass(bits=bits, block_size=0, min_elements=0)(model)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    q = dq.inputs[0].const_value.numpy()
    assert q.dtype == np.int8 and (q.min() < -64 if bits == 8 else -64 <= q.min() <= q.max() <= 63)
    qdq = run_ort(model, FEEDS)
    LowerDynamicQuantizeMatMulPass()(model)
    node = next(n for n in model.graph if n.op_type == "DynamicQuantizeMatMul")
    assert node.inputs[1].const_value.dtype == stored
    assert compare(qdq, run_ort(model, FEEDS))["cosine"] > 0.999


def test_blocked_weights_are_left_to_matmul_nbits():
    model = _model(k=64)
    QuantizeWeightsPass(bits=8, block_size=32, min_elements=0)(model)
    result = LowerDynamicQuantizeMatMulPass()(model)
    assert result.stats["lowered"] == 0 and any("blocked weights" in r for r in result.rejected)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gather_dequantizes_only_its_rows_exactly(symmetric):
    model = _model()
    QuantizeWeightsPass(bits=8, block_size=0, symmetric=symmetric, min_elements=0)(model)
    before = run_ort(model, FEEDS)
    result = GatherQuantizedRowsPass()(model)
    verify(model)
    assert result.stats == {"tables_seen": 1, "rewritten": 1}
    gather = next(n for n in model.graph if n.op_type == "Gather")
    assert gather.inputs[0].const_value is not None  # reads the int8 table itself
    assert compare(before, run_ort(model, FEEDS))["max_rel"] == 0.0
    assert not GatherQuantizedRowsPass()(model).modified


def test_a_4bit_table_is_left_whole():
    """opset 21's Gather takes no int4: a 4-bit table that GatherBlockQuantized could not take stays as it is."""
    model = _model()
    QuantizeWeightsPass(bits=4, block_size=16, min_elements=0)(model)  # K = 40: not whole blocks
    before = run_ort(model, FEEDS)
    result = GatherQuantizedRowsPass()(model)
    assert result.stats["rewritten"] == 0 and any("int4" in r for r in result.rejected)
    assert compare(before, run_ort(model, FEEDS))["max_rel"] == 0.0

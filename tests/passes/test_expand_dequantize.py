"""expand-dequantize: exact against ORT's DequantizeLinear, weights kept quantized."""

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from conftest import assert_same_outputs
from kiln.ir import verify
from kiln.passes.expand_dequantize import ExpandDequantizeError, ExpandDequantizePass

K, N, IDS = 128, 48, 3
_TYPES = {ir.DataType.INT4: (ml_dtypes.int4, -8, 7), ir.DataType.UINT4: (ml_dtypes.uint4, 0, 15),
          ir.DataType.INT8: (np.int8, -128, 127), ir.DataType.UINT8: (np.uint8, 0, 255)}


def _out(node: ir.Node, name: str, shape: list) -> ir.Value:
    value = node.outputs[0]
    value.name, value.dtype, value.shape = name, ir.DataType.FLOAT, ir.Shape(shape)
    return value


def _quantized_model(dtype: ir.DataType, block: int, zero_point: bool) -> ir.Model:
    """y = x @ DQ(W[K, N]) (blocks along K); a table T = W^T [N, K] (blocks along K, axis 1)
    read twice, as a tied embedding is: e = Gather(DQ(T), ids) and y2 = x @ Transpose(DQ(T))."""
    np_type, lo, hi = _TYPES[dtype]
    rng = np.random.default_rng(0)
    bs = block or K
    q = rng.integers(lo, hi + 1, size=(K, N))
    scale = rng.uniform(0.01, 0.1, size=(K // bs, N)).astype(np.float32)
    zero = rng.integers(lo, hi + 1, size=(K // bs, N))

    def dq(values, scales, zeros, axis):
        inputs = [ir.val(f"w{axis}", const_value=ir.tensor(values.astype(np_type), dtype=dtype)),
                  ir.val(f"s{axis}", const_value=ir.tensor(np.ascontiguousarray(scales)))]
        if zero_point:
            inputs.append(ir.val(f"z{axis}", const_value=ir.tensor(zeros.astype(np_type), dtype=dtype)))
        return ir.node("DequantizeLinear", inputs, attributes={"axis": axis, "block_size": bs}, num_outputs=1), inputs

    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["B", K]))
    ids = ir.val("ids", ir.DataType.INT64, ir.Shape(["B", IDS]))
    weight, w_inits = dq(q, scale, zero, 0)
    table, t_inits = dq(np.ascontiguousarray(q.T), scale.T, np.ascontiguousarray(zero.T), 1)
    matmul = ir.node("MatMul", [x, weight.outputs[0]], num_outputs=1)
    gather = ir.node("Gather", [table.outputs[0], ids], attributes={"axis": 0}, num_outputs=1)
    transpose = ir.node("Transpose", [table.outputs[0]], attributes={"perm": [1, 0]}, num_outputs=1)
    head = ir.node("MatMul", [x, transpose.outputs[0]], num_outputs=1)
    outputs = [_out(matmul, "y", ["B", N]), _out(gather, "e", ["B", IDS, K]), _out(head, "y2", ["B", N])]
    graph = ir.Graph([x, ids], outputs, nodes=[weight, table, matmul, gather, transpose, head],
                     initializers=w_inits + t_inits, opset_imports={"": 21}, name="quantized")
    return ir.Model(graph, ir_version=10)


def _feeds():
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((2, K)).astype(np.float32), "ids": rng.integers(0, N, size=(2, IDS))}


@pytest.mark.parametrize("zero_point", [False, True], ids=["symmetric", "zero-point"])
@pytest.mark.parametrize("block", [32, 0], ids=["blocked", "per-channel"])
@pytest.mark.parametrize("dtype", list(_TYPES), ids=lambda d: d.name.lower())
def test_expansion_is_exact_and_keeps_the_weights_quantized(dtype, block, zero_point):
    model = _quantized_model(dtype, block, zero_point)
    before = model.clone() if hasattr(model, "clone") else ir.from_proto(ir.to_proto(model))
    result = ExpandDequantizePass()(model)
    verify(result.model)
    delta = assert_same_outputs(before, result.model, _feeds(), rtol=0)
    assert delta["max_rel"] == 0  # the same float weights, bit for bit
    four_bit = dtype in (ir.DataType.INT4, ir.DataType.UINT4)
    assert result.stats == {"dequantize_expanded": 2, "packed_4bit": 2 if four_bit else 0, "gathers_by_row": 1,
                            "bytes_stored": result.stats["bytes_stored"], "scales_folded": 0}
    ops = {n.op_type for n in result.model.graph}
    assert "DequantizeLinear" not in ops and ("BitShift" in ops) == four_bit
    # integer storage: 4-bit values two per byte, 8-bit one per byte, the table stored once
    stored = [v.const_value for v in result.model.graph.initializers.values() if v.const_value.size >= N * K // 2]
    assert len(stored) == 2 and all(t.dtype in (ir.DataType.UINT8, ir.DataType.INT8) for t in stored)
    assert all(t.size == (N * K // 2 if four_bit else N * K) for t in stored)
    assert not ExpandDequantizePass()(result.model).modified


def test_compact_scales_are_folded_and_the_expansion_stays_exact(prepared):
    from kiln.passes.quantize_weights import QuantizeWeightsPass
    from test_quantize_weights import _llama

    model, feeds = _llama(prepared)
    QuantizeWeightsPass(bits=4, block_size=16, symmetric=False, compact_scales=True, min_elements=0)(model)
    before = ir.from_proto(ir.to_proto(model))
    result = ExpandDequantizePass()(model)
    verify(result.model)
    assert result.stats["scales_folded"] == result.stats["dequantize_expanded"] == 16
    assert "DequantizeLinear" not in {n.op_type for n in result.model.graph}
    assert assert_same_outputs(before, result.model, feeds, rtol=1e-6)["max_rel"] < 1e-6


def test_a_gather_dequantizes_only_its_rows():
    model = ExpandDequantizePass()(_quantized_model(ir.DataType.INT4, 32, False)).model
    gathered = [n for n in model.graph if n.op_type == "Gather"]
    assert len(gathered) == 2  # the packed rows and their scales: no whole-table dequantize before it
    assert all(n.inputs[0].const_value is not None for n in gathered)


def test_activation_qdq_without_blocks_is_left_to_the_importer():
    x = ir.val("x", ir.DataType.UINT8, ir.Shape([4]))
    scale = ir.val("s", const_value=ir.tensor(np.array(0.5, np.float32)))
    dq = ir.node("DequantizeLinear", [x, scale], num_outputs=1)
    graph = ir.Graph([x], [_out(dq, "y", [4])], nodes=[dq], initializers=[scale], opset_imports={"": 21}, name="a")
    assert not ExpandDequantizePass()(ir.Model(graph, ir_version=10)).modified


def test_a_form_it_cannot_expand_is_one_clear_error():
    model = _quantized_model(ir.DataType.INT8, 32, False)
    weight = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    weight.attributes["block_size"] = ir.AttrInt64("block_size", 48)  # 128 is not a whole number of 48s
    with pytest.raises(ExpandDequantizeError, match=r"not a whole number of blocks of 48") as info:
        ExpandDequantizePass()(model)
    assert "\n" not in str(info.value)

    x = ir.val("x", ir.DataType.INT8, ir.Shape([K, N]))  # a blocked DequantizeLinear of an activation
    scale = ir.val("s", const_value=ir.tensor(np.ones((K // 32, N), np.float32)))
    dq = ir.node("DequantizeLinear", [x, scale], attributes={"axis": 0, "block_size": 32}, num_outputs=1)
    graph = ir.Graph([x], [_out(dq, "y", [K, N])], nodes=[dq], initializers=[scale], opset_imports={"": 21}, name="b")
    with pytest.raises(ExpandDequantizeError, match="non-constant input"):
        ExpandDequantizePass()(ir.Model(graph, ir_version=10))

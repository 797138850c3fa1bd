"""gather-quantized-rows: a Gather over a quantized table dequantizes only the rows it reads."""

import pytest
from _helpers import GATHER_FEEDS, gather_matmul_model

from kiln.ir import verify
from kiln.passes.gather_quantized_rows import GatherQuantizedRowsPass
from kiln.passes.numerics import compare, run_ort
from kiln.passes.quantize_weights import QuantizeWeightsPass


@pytest.mark.parametrize("symmetric", [True, False])
def test_gather_dequantizes_only_its_rows_exactly(symmetric):
    model = gather_matmul_model()
    QuantizeWeightsPass(bits=8, block_size=0, symmetric=symmetric, min_elements=0)(model)
    before = run_ort(model, GATHER_FEEDS)
    result = GatherQuantizedRowsPass()(model)
    verify(model)
    assert result.stats == {"tables_seen": 1, "rewritten": 1}
    gather = next(n for n in model.graph if n.op_type == "Gather")
    assert gather.inputs[0].const_value is not None  # reads the int8 table itself
    assert compare(before, run_ort(model, GATHER_FEEDS))["max_rel"] == 0.0
    assert not GatherQuantizedRowsPass()(model).modified


def test_a_4bit_table_is_left_whole():
    """opset 21's Gather takes no int4: a 4-bit table that GatherBlockQuantized could not take stays as it is."""
    model = gather_matmul_model()
    QuantizeWeightsPass(bits=4, block_size=16, min_elements=0)(model)  # K = 40: not whole blocks
    before = run_ort(model, GATHER_FEEDS)
    result = GatherQuantizedRowsPass()(model)
    assert result.stats["rewritten"] == 0 and any("int4" in r for r in result.rejected)
    assert compare(before, run_ort(model, GATHER_FEEDS))["max_rel"] == 0.0

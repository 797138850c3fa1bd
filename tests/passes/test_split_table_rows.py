"""split-table-rows: exact on tied and untied tables, the hot rows are the calibration text's most
frequent tokens, quantize-weights keeps them at 8 bits and counts the rank table, and the ORT
lowering runs both halves (MatMulNBits, GatherBlockQuantized) end to end."""

import collections

import numpy as np
import onnx_ir as ir
import pytest

from kiln.ir import load_model, summary, verify
from kiln.models import sample_inputs
from kiln.passes import create_pass, run_pipeline
from kiln.passes.numerics import compare, run_ort
from kiln.passes.quantization import BITS_HINT, INDEX_HINT, bits_per_weight
from kiln.passes.split_table_rows import SplitTableRowsPass

ROWS = 16


def _model(prepared, tie: bool):
    p = prepared("tiny-llama")
    model = load_model(p.path)
    feeds = sample_inputs(p.meta, summary(model).inputs)
    model = run_pipeline(model, [create_pass(n) for n in ("fold-constants", "simplify", "fold-constants")], feeds,
                         progress=False).model
    graph = model.graph
    table = next(n for n in graph if n.op_type == "Gather").inputs[0]
    if tie:  # tiny-llama's head holds a copy of the table: read the table itself, as tied models do
        head = next(n for n in graph if n.outputs[0].is_graph_output() and n.op_type == "MatMul")
        np.testing.assert_array_equal(head.inputs[1].const_value.numpy(), table.const_value.numpy().T)
        transpose = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, num_outputs=1)
        graph.insert_before(head, transpose)
        head.replace_input_with(1, transpose.outputs[0])
    return model, feeds, table.const_value.numpy()


def _split(model, feeds, rows=ROWS):
    p = SplitTableRowsPass(rows=rows)
    p.calibration = [feeds]
    return p(model)


@pytest.mark.parametrize("tie", [True, False])
def test_split_is_exact_and_keeps_the_most_frequent_rows(prepared, tie):
    model, feeds, table = _model(prepared, tie)
    before = run_ort(model, feeds)
    result = _split(model, feeds)
    verify(model)
    assert result.modified and result.stats["tables"] == 1 and result.stats["heads"] == (1 if tie else 0)
    assert compare(before, run_ort(model, feeds))["max_abs"] == 0
    assert [o.name for o in model.graph.outputs] == list(before)

    inits = model.graph.initializers
    hot = next(v for v in inits.values() if v.name.endswith(".hot"))
    cold = next(v for v in inits.values() if v.name.endswith(".cold"))
    rank = next(v for v in inits.values() if INDEX_HINT in v.metadata_props)
    assert hot.metadata_props[BITS_HINT] == "8" and rank.const_value.dtype == ir.DataType.INT32
    assert rank.metadata_props[INDEX_HINT] == f"{hot.name},{cold.name}"
    counts = collections.Counter(feeds["input_ids"].reshape(-1).tolist())
    top = {t for t, _ in counts.most_common(ROWS) if counts[t] > counts.most_common(ROWS + 1)[-1][1]}
    hot_rows = {int(i) for i in np.flatnonzero(rank.const_value.numpy() < ROWS)}
    assert top <= hot_rows and len(hot_rows) == ROWS
    order = np.argsort(rank.const_value.numpy())
    np.testing.assert_array_equal(hot.const_value.numpy(), table[order[:ROWS]])
    np.testing.assert_array_equal(cold.const_value.numpy(), table[order[ROWS:]])
    share = sum(counts[t] for t in hot_rows) / feeds["input_ids"].size
    assert result.stats["hot_token_share"] == pytest.approx(share, abs=1e-3)


def test_a_table_not_larger_than_rows_is_left_whole(prepared):
    model, feeds, table = _model(prepared, tie=True)
    name = next(n for n in model.graph if n.op_type == "Gather").inputs[0].name
    result = _split(model, feeds, rows=table.shape[0])
    assert not result.modified and result.stats["tables"] == 0
    assert result.rejected == [f"{name}: {table.shape[0]} rows, not more than rows = {table.shape[0]}; left whole"]


def test_quantize_weights_keeps_hot_rows_at_8_bits_and_counts_the_rank(prepared):
    model, feeds, table = _model(prepared, tie=True)
    _split(model, feeds)
    q = create_pass("quantize-weights", {"bits": 4, "block_size": 32, "symmetric": False, "min_elements": 512})
    result = q(model)
    verify(model)
    dq = {n.inputs[0].name: n.inputs[0].const_value.dtype for n in model.graph if n.op_type == "DequantizeLinear"}
    hot = [d for name, d in dq.items() if ".hot" in name]
    cold = [d for name, d in dq.items() if ".cold" in name]
    assert hot == [ir.DataType.UINT8] and cold == [ir.DataType.UINT4]
    assert any(r.endswith(".hot: 8 bits (asked by the graph)") for r in result.rejected)
    # the stored bits: every weight's values, scales and zero points, plus the int32 rank table
    v, h = table.shape
    stored = sum(w.size * bits_per_weight(4, 32, w.shape[0], False) for w in _float_weights(prepared))
    stored += ROWS * h * (bits_per_weight(8, 32, h, False) - bits_per_weight(4, 32, h, False)) + 32 * v
    assert result.stats["bits_per_weight"] == pytest.approx(stored / sum(w.size for w in _float_weights(prepared)),
                                                            abs=2e-3)


def test_the_rank_table_counts_only_when_its_tables_are_quantized(prepared):
    options = {"bits": 4, "block_size": 32, "min_elements": 512, "include_lm_head": False, "include_embedding": False}
    plain, _, _ = _model(prepared, tie=True)
    expected = create_pass("quantize-weights", options)(plain).stats["bits_per_weight"]
    model, feeds, _ = _model(prepared, tie=True)
    _split(model, feeds)
    result = create_pass("quantize-weights", options)(model)
    assert result.stats["bits_per_weight"] == expected  # the halves stay float: their rank table is not counted
    assert not any(".hot" in n.inputs[0].name or ".cold" in n.inputs[0].name
                   for n in model.graph if n.op_type == "DequantizeLinear")


def _float_weights(prepared):
    """tiny-llama's quantized weights as [K, N] (the tied head reads the table, counted once)."""
    model, _, table = _model(prepared, tie=True)
    weights = [n.inputs[1].const_value.numpy() for n in model.graph if n.op_type == "MatMul"
               and n.inputs[1].const_value is not None and n.inputs[1].const_value.size >= 512]
    return [*weights, table.T]


def test_lm_head_choice_still_applies_to_a_split_head(prepared):
    model, feeds, _ = _model(prepared, tie=True)
    _split(model, feeds)
    result = create_pass("quantize-weights", {"include_lm_head": False, "min_elements": 512})(model)
    assert any("LM head left in float" in r for r in result.rejected)
    # the embedding's Gathers read the quantized halves, the head's Transposes the float ones
    halves = [n for n in model.graph if n.op_type == "Transpose" and n.inputs[0].name.endswith((".hot", ".cold"))]
    assert len(halves) == 2 and all(t.inputs[0].const_value is not None for t in halves)


@pytest.mark.slow  # a full compile with calibration
def test_split_table_compiles_lowers_and_generates(tmp_path):
    """tiny-llama with 64 hot rows through rotation, GPTQ and ORT lowering: both halves run as
    MatMulNBits (8 and 4 bits) and GatherBlockQuantized, and the artifact generates."""
    import kiln

    recipe = tmp_path / "split.toml"
    recipe.write_text('name = "split"\nbase = "fp32"\n'
                      '[[passes]]\nname = "rotate-residual"\n'
                      '[[passes]]\nname = "split-table-rows"\nrows = 64\n'
                      '[[passes]]\nname = "quantize-weights"\nmethod = "gptq"\nsymmetric = false\nbudget = 1.0\n'
                      '[[passes]]\nname = "eliminate-dead-code"\n')
    result = kiln.compile("tiny-llama", tmp_path / "q", recipe=recipe, progress=False)
    records = {r["name"]: r for r in result.manifest["passes"]}
    assert records["split-table-rows"]["modified"] and records["split-table-rows"]["delta"]["max_rel"] < 1e-4
    ops = result.manifest["summary"]["artifact"]["ops"]
    assert ops.get("com.microsoft::GatherBlockQuantized") == 2
    bits = records["lower-matmul-nbits"]["stats"]
    assert bits["tables_lowered"] == bits["tables_seen"] == 2 and bits["lowered"] == bits["quantized_matmuls_seen"]
    assert len(kiln.load(result.path).generate("hello", max_new_tokens=5).token_ids) == 5


@pytest.mark.parametrize("kwargs, message", [({"rows": 0}, "rows must be >= 1"),
                                             ({"bits": 6}, "bits \\(of the frequent rows\\) must be 4 or 8")])
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SplitTableRowsPass(**kwargs)


@pytest.mark.slow  # two calibrated compiles
def test_recipe_sets_the_calibration_windows_and_a_derived_recipe_inherits_them(tmp_path):
    """int4-quality calibrates on 128 windows; a recipe based on it keeps them, unless it sets its own."""
    import kiln
    from kiln.recipes import load_recipe

    assert load_recipe("int4-quality").calibration_windows == 128
    assert load_recipe("int4").calibration_windows is None  # kiln.corpus.CALIBRATION_WINDOWS
    derived = tmp_path / "derived.toml"
    derived.write_text('base = "int4-quality"\n[[passes]]\nname = "eliminate-dead-code"\n')
    assert load_recipe(derived).calibration_windows == 128
    derived.write_text('base = "int4-quality"\ncalibration_windows = 3\n[[passes]]\nname = "eliminate-dead-code"\n')
    assert load_recipe(derived).calibration_windows == 3

    recipe = tmp_path / "split.toml"
    recipe.write_text('base = "fp32"\ncalibration_windows = 2\n[[passes]]\nname = "split-table-rows"\nrows = 8\n')
    result = kiln.compile("tiny-llama", tmp_path / "q", recipe=recipe, progress=False)
    assert result.manifest["compile"]["calibration"]["windows"] == 2

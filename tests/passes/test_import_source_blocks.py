"""import-source-blocks: a GGUF file's own blocks, found by content and imported exactly."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from _helpers import GATHER_FEEDS, gather_matmul_model
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from kiln.models.gguf_blocks import DECODERS, GGUFBlocks
from kiln.passes import create_pass
from kiln.passes.pipeline import run_pipeline

# where each format keeps its fp16 scale fields (byte offsets in a block)
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q8_0: [0], T.Q5_0: [0], T.Q5_1: [0, 2],
              T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [-2]}


def _random_blocks(kind, rows: int, k: int, rng) -> np.ndarray:
    """Raw blocks of `kind` with random integers and sane fp16 scales: [rows, bytes per row]."""
    per_block, size = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (rows * (k // per_block), size), dtype=np.uint8)
    for at in F16_FIELDS[kind]:
        scales = (rng.random(raw.shape[0]) * 0.02 + 1e-3).astype(np.float16)
        start = at % size
        raw[:, start:start + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def _write_gguf(path, tensors: dict[str, tuple[T, np.ndarray]]) -> None:
    writer = GGUFWriter(str(path), "llama")
    for name, (kind, raw) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", list(DECODERS), ids=lambda k: k.name)
def test_every_format_decodes_to_ggufs_own_dequantization(kind, tmp_path):
    rng = np.random.default_rng(int(kind))
    k = 512
    a, b = _random_blocks(kind, 6, k, rng), _random_blocks(kind, 4, k, rng)
    _write_gguf(tmp_path / "m.gguf", {"a": (kind, a), "b": (kind, b)})
    source = GGUFBlocks(tmp_path / "m.gguf")
    # rows of two tensors, permuted (a loader's head reordering, or Q/K/V packed in one MatMul)
    rows = np.concatenate([dequantize(a, kind)[[4, 0, 5]], dequantize(b, kind)[[2, 3]]])
    parts = source.find(rows)
    assert parts is not None and len(parts) == 1 and parts[0].format == kind.name
    found = parts[0]
    assert found.q.dtype == np.int8
    lo, hi = (-8, 7) if found.bits == 4 else (-128, 127)
    assert lo <= found.q.min() and found.q.max() <= hi
    np.testing.assert_allclose(found.dequantize(), rows, rtol=1e-6, atol=1e-6 * np.abs(rows).max())


def test_rows_not_in_the_file_are_not_found_and_rows_of_two_formats_come_in_parts(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    _write_gguf(tmp_path / "m.gguf", {"a": (T.Q4_0, quantize(w, T.Q4_0)), "b": (T.Q8_0, quantize(w, T.Q8_0))})
    source = GGUFBlocks(tmp_path / "m.gguf")
    a, b = dequantize(quantize(w, T.Q4_0), T.Q4_0), dequantize(quantize(w, T.Q8_0), T.Q8_0)
    assert source.find(w) is None  # the float weights themselves
    assert source.find(np.concatenate([w[:1], a[1:]])) is None  # one row is not the file's
    parts = source.find(np.concatenate([a[:2], b[2:], a[3:]]))  # Q, K and V packed from two formats
    assert [(p.format, len(p.q)) for p in parts] == [("Q4_0", 2), ("Q8_0", 2), ("Q4_0", 1)]


def _gguf_model(tmp_path, table_kind, weight_kind, tied):
    """gather_matmul_model whose weights are the dequantized blocks of a GGUF file beside it."""
    model = gather_matmul_model(k=64, n=48, vocab=50, tied=tied)
    tensors = {}
    for kind, name in ((table_kind, "E"), (weight_kind, "W")):
        value = model.graph.initializers.get(name)
        if value is None:
            continue
        array = value.const_value.numpy()
        rows = array if name == "E" else array.T  # GGUF rows are output channels
        raw = quantize(rows, kind)
        back = dequantize(raw, kind)
        value.const_value = ir.tensor(back if name == "E" else np.ascontiguousarray(back.T), name=name)
        tensors[name] = (kind, raw)
    _write_gguf(tmp_path / "m.gguf", tensors)
    return model, GGUFBlocks(tmp_path / "m.gguf")


def _run(model, source, *names):
    small = {"quantize-weights": {"min_elements": 16}}
    passes = [create_pass(n, small.get(n, {})) for n in names]
    return run_pipeline(model, passes, dict(GATHER_FEEDS), source_blocks=source, progress=False)


@pytest.mark.parametrize("weight_kind", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda k: k.name)
def test_imported_weights_compute_what_the_float_ones_did_and_lower_to_ort_ops(weight_kind, tmp_path):
    model, source = _gguf_model(tmp_path, T.Q8_0, weight_kind, tied=False)
    run = _run(model, source, "import-source-blocks", "lower-matmul-nbits")
    imported, lowered = run.records
    assert imported["stats"]["weights_imported"] == 2, imported
    assert imported["stats"][f"format_{weight_kind.name}"] == 1 + (weight_kind == T.Q8_0)  # the table is Q8_0
    assert imported["delta"]["max_rel"] < 1e-5 and lowered["delta"]["max_rel"] < 1e-5  # fp32 activations: exact
    ops = [n.op_type for n in run.model.graph]
    assert ops.count("MatMulNBits") == 1 and ops.count("GatherBlockQuantized") == 1
    # a format with offsets adds one MatMul on the activations' block sums; the others none
    assert ops.count("MatMul") == 2 * (weight_kind == T.Q4_1)
    assert not [v for v in run.model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT
                and v.const_value.size >= 50 * 64 // 32 + 1 and "offset" not in v.name]


def test_a_tied_table_is_imported_once_for_the_gather_and_the_head(tmp_path):
    model, source = _gguf_model(tmp_path, T.Q8_0, None, tied=True)
    run = _run(model, source, "import-source-blocks")
    assert run.records[0]["stats"]["weights_imported"] == 1
    assert [n.op_type for n in run.model.graph].count("DequantizeLinear") == 1
    assert run.records[0]["delta"]["max_rel"] < 1e-5


def test_a_table_with_offsets_read_by_a_gather_stays_float_with_the_reason(tmp_path):
    model, source = _gguf_model(tmp_path, T.Q4_1, None, tied=True)
    run = _run(model, source, "import-source-blocks")
    assert run.records[0]["stats"]["weights_imported"] == 0
    assert any("Q4_1 table read by a Gather" in r for r in run.records[0]["rejected"])


def test_without_a_block_source_the_pass_changes_nothing_and_says_why(tmp_path):
    model, _ = _gguf_model(tmp_path, T.Q8_0, T.Q4_1, tied=False)
    run = _run(model, None, "import-source-blocks")
    assert run.records[0]["stats"]["weights_imported"] == 0
    assert run.records[0]["rejected"] == ["the source stores no block-quantized weights"]


def test_quantize_weights_leaves_imported_weights_as_they_are(tmp_path):
    model, source = _gguf_model(tmp_path, T.Q8_0, T.Q4_1, tied=False)
    run = _run(model, source, "import-source-blocks", "quantize-weights")
    assert run.records[1]["stats"]["weights_quantized"] == 0
    assert not run.records[1].get("rejected")  # the imported scales are not candidates, nor reasons
    assert run.records[1]["modified"] is False


def test_a_weight_packed_from_two_formats_becomes_one_matmul_per_format(tmp_path):
    model = gather_matmul_model(k=64, n=48, vocab=50, tied=False)
    w = model.graph.initializers["W"]
    rows = w.const_value.numpy().T  # [N, K]
    raw_a, raw_b = quantize(rows[:32], T.Q4_1), quantize(rows[32:], T.Q8_0)
    packed = np.concatenate([dequantize(raw_a, T.Q4_1), dequantize(raw_b, T.Q8_0)])
    w.const_value = ir.tensor(np.ascontiguousarray(packed.T), name="W")
    _write_gguf(tmp_path / "m.gguf", {"a": (T.Q4_1, raw_a), "b": (T.Q8_0, raw_b)})
    run = _run(model, GGUFBlocks(tmp_path / "m.gguf"), "import-source-blocks", "lower-matmul-nbits")
    assert run.records[0]["stats"]["format_Q4_1"] == 1 and run.records[0]["stats"]["format_Q8_0"] == 1
    assert run.records[0]["delta"]["max_rel"] < 1e-5 and run.records[1]["delta"]["max_rel"] < 1e-5
    ops = [n.op_type for n in run.model.graph]
    assert ops.count("MatMulNBits") == 2 and ops.count("Concat") == 1

"""`kiln compile MODEL.gguf -r int4` keeps the file's own blocks: no second rounding."""

from __future__ import annotations

import json

import pytest
from conftest import run_kiln
from tiny_gguf import write_tiny_llama_gguf

pytestmark = pytest.mark.slow  # a tiny-llama export and an int4 compile with calibration (about 40 s)


def test_int4_of_a_gguf_imports_every_block_and_equals_transformers_before_lowering(tmp_path):
    gguf = write_tiny_llama_gguf(tmp_path / "tiny-llama.gguf")
    out = tmp_path / "out"
    proc = run_kiln("compile", str(gguf), "-o", str(out), "-r", "int4")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "kiln.json").read_text())
    records = {r["name"]: r for r in manifest["passes"]}
    imported = records["import-source-blocks"]["stats"]
    # 2 layers x (Q, K, O, gate, down in Q4_1; V in Q4_0; up in Q8_0) + the tied Q8_0 table; packed
    # Q/K/V and gate/up weights of two formats are split into one part per format
    assert (imported["format_Q4_1"], imported["format_Q4_0"], imported["format_Q8_0"]) == (8, 2, 4)
    assert records["import-source-blocks"]["delta"]["max_rel"] < 1e-5
    assert records["quantize-weights"]["stats"]["weights_quantized"] == 0  # nothing left to round again
    # the gate compares with transformers (the GGUF dequantized to fp32) where the graph is last
    # exact, after the import: batch 2, left padding, prefill and 4 cached decode steps
    assert manifest["compile"]["parity"]["max_rel"] < 1e-4
    assert manifest["compile"]["parity"]["argmax_agreement"] == 1.0

"""Roofline arithmetic on tiny compiled artifacts, `kiln inspect` printing it, and the shared bench helper."""

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_kiln

import kiln
from kiln import roofline
from kiln.bench import ArtifactLM, encoder_ids, time_generation

# tiny-llama (models/tiny.py): hidden 64, MLP 128, 2 layers, 4 query heads, 2 KV heads (head 16), vocab 320, tied.
HIDDEN, MLP, LAYERS, HEADS, KV_HEADS, HEAD, VOCAB = 64, 128, 2, 4, 2, 16, 320
MATMUL_PARAMS = LAYERS * (HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD + HEADS * HEAD * HIDDEN + 3 * HIDDEN * MLP) + HIDDEN * VOCAB


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, compiled) -> dict[str, Path]:
    """tiny-llama compiled with the fp32 and int4 recipes (int4 by RTN, untuned: the same format and
    bytes as the preset, without its minute of GPTQ and scale tuning)."""
    preset = (Path(kiln.__file__).parent / "recipes" / "int4.toml").read_text()
    fast = tmp_path_factory.mktemp("roofline") / "int4-rtn.toml"
    fast.write_text(preset.replace('method = "gptq"', 'method = "rtn"').replace("tune_steps = 100", "tune_steps = 0"))
    assert fast.read_text().count("tune_steps = 0") == 1 and 'method = "rtn"' in fast.read_text()
    return {"fp32": compiled("tiny-llama", "fp32"), "int4": compiled("tiny-llama", fast)}


def _onnx_matmul_params(path) -> int:
    """2-D constant B operands of MatMul, read independently of kiln.roofline (through a Transpose too)."""
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    transposed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    total = 0
    for node in model.graph.node:
        if node.op_type == "MatMul":
            b = transposed.get(node.input[1], node.input[1])
            if b in inits:
                total += math.prod(inits[b])
    return total


def test_fp32_flops_are_twice_the_matmul_parameters(tiny):
    a = roofline.from_artifact(tiny["fp32"])
    assert a.matmul_params == MATMUL_PARAMS == _onnx_matmul_params(tiny["fp32"])
    assert a.decode(0)["flops"] == 2 * MATMUL_PARAMS
    assert a.weight_flops_per_token == 2 * MATMUL_PARAMS


def test_kv_bytes_and_attention_at_depth(tiny):
    a = roofline.from_artifact(tiny["fp32"])
    assert a.kv_bytes_per_token == 2 * LAYERS * KV_HEADS * HEAD * 4
    depth = 100
    step = a.decode(depth)
    assert step["kv_bytes"] == depth * a.kv_bytes_per_token
    assert step["bytes"] == a.weight_bytes_per_token + depth * a.kv_bytes_per_token
    # QK^T and AV: 2 FLOPs per multiply-add, head_dim each, every query head, every layer.
    assert step["flops"] == 2 * MATMUL_PARAMS + depth * 2 * LAYERS * HEADS * (2 * HEAD)
    prefill = a.prefill(8)
    assert prefill["flops"] == 8 * 2 * MATMUL_PARAMS + 2 * LAYERS * HEADS * (2 * HEAD) * (8 * 7 // 2)


def test_fp32_bytes_read_per_token(tiny):
    a = roofline.from_artifact(tiny["fp32"])
    assert a.matmul_bytes == 4 * MATMUL_PARAMS  # every fp32 matmul weight, once
    assert a.gather_row_bytes == 4 * HIDDEN  # one embedding row, not the table
    assert a.gathers == 1
    assert 0 < a.other_bytes_per_token < 0.05 * a.matmul_bytes  # norms, constants, rotary rows
    assert a.weight_bytes_per_token < a.parameter_bytes  # the table is not read whole by the lookup


def test_int4_reads_packed_bytes(tiny):
    fp32, int4 = roofline.from_artifact(tiny["fp32"]), roofline.from_artifact(tiny["int4"])
    assert int4.matmul_params == fp32.matmul_params  # the same logical matmuls, as MatMulNBits
    assert int4.decode(0)["flops"] == 2 * MATMUL_PARAMS
    manifest = json.loads((tiny["int4"] / "kiln.json").read_text())
    block = next(p["params"]["block_size"] for p in manifest["recipe"]["passes"] if p["name"] == "quantize-weights")
    # 4 bits per weight plus an fp32 scale per block (and a packed zero point if stored: half a
    # byte, or a whole one where a column's blocks are odd in number and the last byte is padded).
    low, high = 0.5 + 4 / block, 0.5 + 5 / block
    assert MATMUL_PARAMS * low <= int4.matmul_bytes <= MATMUL_PARAMS * high * 1.01
    # GatherBlockQuantized: one row of packed values, its scales (and zero points).
    assert HIDDEN * low <= int4.gather_row_bytes <= HIDDEN * high + 2
    assert int4.kv_bytes_per_token == fp32.kv_bytes_per_token


def test_bound_and_ceiling():
    c = roofline.Ceiling(bandwidth_gb_s=10.0, flops_gflop_s=100.0)
    assert c.balance == 10.0
    mem = roofline.bound(1e9, 1e9, c)  # 1 FLOP/byte < 10: memory bound, 0.1 s
    assert mem["bound"] == "memory" and mem["seconds"] == pytest.approx(0.1)
    cmp = roofline.bound(1e6, 1e9, c)
    assert cmp["bound"] == "compute" and cmp["seconds"] == pytest.approx(0.01)
    measured = roofline.measure(threads=1, mbytes=8, gemm=64, repeats=1)
    assert measured.bandwidth_gb_s > 0 and measured.flops_gflop_s > 0


def test_encoder_forward(tmp_path, prepared):
    prepared("tiny-bert")
    kiln.compile("tiny-bert", tmp_path / "bert", progress=False)
    a = roofline.from_artifact(tmp_path / "bert")
    assert not a.layout.kv_cache and a.kv_bytes_per_token == 0
    assert a.gathers == 3  # word, position and token-type rows
    f = a.forward(2, 16)
    assert f["flops"] == 2 * 16 * a.weight_flops_per_token + 2 * a.layout.attention_flops_per_context_token * 16 * 16


def test_inspect_prints_the_arithmetic(tiny):
    proc = run_kiln("inspect", str(tiny["fp32"]), "--bandwidth", "10", "--flops", "100", "--depth", "64", env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "roofline arithmetic" in text
    assert f"2 x {MATMUL_PARAMS:,} matmul parameters" in text
    assert "KV cache 512 B per token" in text
    for case in ("decode @0", "decode @64", "prefill 512"):
        assert case in text
    assert "memory" in text and "compute" in text  # decode is memory bound, a 512-token prefill compute bound
    proc = run_kiln("inspect", str(tiny["int4"]), "--json", "--bandwidth", "10", "--flops", "100")
    data = json.loads(proc.stdout)["arithmetic"]
    assert data["weight_flops_per_token"] == 2 * MATMUL_PARAMS
    assert data["kv_bytes_per_token"] == 512
    cases = {c["case"]: c for c in data["cases"]}
    assert cases["decode @0"]["bound"] == "memory"
    assert cases["decode @0"]["ceiling_tok_s"] == pytest.approx(10e9 / data["weight_bytes_per_token"])
    assert data["ceiling"]["source"] == "given"


def test_shared_timing_helper_decodes_greedily(tiny):
    art = kiln.load(tiny["fp32"])
    ids = art.encode("hello there")
    timed = time_generation(ArtifactLM(art), ids, 5)
    assert timed["tokens"] == art.generate(ids, 6).token_ids
    assert timed["ttft_s"] > 0 and timed["decode_s_per_token"] > 0
    assert time_generation(ArtifactLM(art), ids, 0)["tokens"] == timed["tokens"][:1]


def test_bench_cli(tiny):
    proc = run_kiln("bench", str(tiny["int4"]), "--prompt-tokens", "8", "--new-tokens", "3", "--repeats", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {"ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb"} <= set(result)


def test_encoder_ids_fit_the_vocabulary():
    ids = encoder_ids(2, 16, vocab_size=320)
    assert ids.shape == (2, 16) and ids.max() < 320
    assert np.array_equal(ids, encoder_ids(2, 16, vocab_size=320))  # identical for every system
    assert encoder_ids(1, 8)[0, 0] == 101

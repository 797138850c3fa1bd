"""The speed benchmark (benchmarks/timing.py, roofline.py, render.py) and benchmarks/plots.py without real models: interleaving, ratios, sections, plots."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ lives in the checkout, not the wheel

from benchmarks import plots, render, roofline, timing
from kiln.bench import LMRunner
from kiln.roofline import Ceiling, Layout


class Fake(LMRunner):
    """Echoes a fixed continuation; records the order it is called in."""

    def __init__(self, name, log, continuation=(7, 8, 9, 10)):
        self.name, self.log, self.cont, self.size_bytes = name, log, list(continuation), 1_000_000

    def prefill(self, ids):
        self.log.append((self.name, len(ids)))
        return self.cont[0]

    def decode(self, token, steps):
        return (self.cont[1:] * steps)[:steps]


PLAN = timing.Plan(prompts=[4, 8], depths=[0, 8], decode_tokens=3, raw_decode_tokens=2, repeats=2)


def _results(static=False):
    log = []
    systems = [Fake("kiln-ort-fp32", log), Fake("pytorch-eager", log), Fake("llama.cpp-q4_1", log, (7, 8, 1, 1))]
    if static:
        tvm = Fake("kiln-tvm-fp32", log)
        tvm.max_tokens = 6  # a static cache: prompt 4 fits, prompt 8 and depth 8 do not
        systems.append(tvm)
    return timing.run_llm(systems, list(range(100, 120)), PLAN), log


def test_rounds_are_interleaved_with_a_warm_up():
    results, log = _results()
    names = [n for n, _ in log]
    per_round = len(names) // (PLAN.repeats + 1)
    assert per_round == 3 * 3  # 3 systems x prompt lengths {1 (depth 0), 4, 8}
    first = names[:per_round]
    assert first == ["kiln-ort-fp32"] * 3 + ["pytorch-eager"] * 3 + ["llama.cpp-q4_1"] * 3
    assert names == first * (PLAN.repeats + 1)
    r = results["kiln-ort-fp32"]
    assert {"ttft_ms_4", "ttft_ms_8", "prefill_tok_s_4", "prefill_tok_s_8", "decode_tok_s_0", "decode_tok_s_8"} <= set(r)
    assert results["kiln-ort-fp32"]["greedy_same_as_pytorch"] == "4/4"
    assert results["llama.cpp-q4_1"]["greedy_same_as_pytorch"] == "2/4"


def test_a_static_cache_runs_only_what_fits():
    results, log = _results(static=True)
    assert {n for n, length in log if n == "kiln-tvm-fp32" and length == 8} == set()
    r = results["kiln-tvm-fp32"]
    assert r["prefill_tok_s_4"] and r["decode_tok_s_0"]
    assert r["prefill_tok_s_8"] is None and r["decode_tok_s_8"] is None and r["greedy_same_as_pytorch"] == "-"


def _data(static=False):
    results, _ = _results(static)
    from kiln.roofline import Arithmetic

    a = Arithmetic(Layout(2, 4, 2, 16, 16, 4, True), matmul_params=1000, matmul_bytes=4000, gather_row_bytes=64)
    rows = roofline.roofline_rows(results, {n: a for n in results}, Ceiling(10, 100, 2), PLAN)
    return {"date": "today", "plan": {"prompts": PLAN.prompts, "depths": PLAN.depths, "decode_tokens": 3,
                                      "raw_decode_tokens": 2, "repeats": 2},
            "machine_line": "Machine: test.", "versions": {"kiln": "0"}, "llm": {"2": results},
            "specs": {n: {"compile_s": 1.5} for n in results}, "rss": {n: 100.0 for n in results},
            "encoder": {"2": {"kiln-ort-fp32": {"size_mb": 1, "latency_b1_s16_ms": 1.0, "latency_b1_s128_ms": 2.0,
                                                "throughput_b32_s128_seq_s": 50.0},
                              "pytorch-eager": {"size_mb": 1, "latency_b1_s16_ms": 2.0, "latency_b1_s128_ms": 4.0,
                                                "throughput_b32_s128_seq_s": 25.0}}},
            "encoder_specs": {}, "encoder_rss": {}, "skipped": {"kiln-tvm": "not yet"},
            "roofline": {"2": {"ceiling": {"bandwidth_gb_s": 10, "flops_gflop_s": 100, "threads": 2, "source": "x"},
                               "systems": rows}}}


def test_sections_have_ratios_against_every_peer():
    data = _data(static=True)
    text = render.llm_section(data, "python -m benchmarks.run")
    assert "Skipped: kiln-tvm (not yet)" in text
    assert "| pytorch-eager |" in text and "| llama.cpp-q4_1 |" in text
    assert "| peer | fp32 decode @0 | fp32 decode @8 | fp32 prefill @8 |" in text
    enc = render.encoder_section(data)
    assert "| pytorch-eager |" in enc and "| 2.00× | 2.00× |" in enc and "fp32 ratio: throughput" in enc
    roof = render.roofline_section(data)
    assert "10 GB/s read" in roof and "memory" in roof
    assert "| kiln-tvm-fp32 |" in text and "| - |" in text and "| kiln-tvm-fp32 |" in roof


def test_unsectioned_text_is_replaced(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\nold table\n| system | a |\n\n<!-- quality-llm:begin -->\nQ\n<!-- quality-llm:end -->\n")
    render.remove_unsectioned(path)
    assert "old table" not in path.read_text() and "<!-- quality-llm:begin -->\nQ" in path.read_text()


def test_pareto_front():
    points = [("a", 100, 5.0), ("b", 50, 10.0), ("c", 120, 6.0), ("d", 40, 30.0)]
    assert [p[0] for p in plots.pareto_front(points)] == ["d", "b", "a"]
    quality = {"smollm2": {"int4": {"size_mb": 90, "ppl_increase": 0.1}, "fp32": {"size_mb": 540, "ppl_increase": 0.0}},
               "minilm": {"int8": {"size_mb": 25, "cosine_mean": 0.99}}}
    compression = {"fp32": {"size_mb": 540}, "configs": {"layers-10": {"size_mb": 480, "ppl": 33.0, "ref_ppl": 30.0}}}
    got = {p[0]: p for p in plots.pareto_points(quality, compression)}
    assert got["int4"][2] == pytest.approx(10.0) and got["layers-10 (structural)"][2] == pytest.approx(10.0)
    assert "int8" not in got


@pytest.mark.slow  # matplotlib
def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    written = plots.make_plots(_data(static=True), tmp_path / "plots", quality=tmp_path / "none.json", compression=tmp_path / "none.json")
    assert {p.name for p in written} == {"speed.png", "encoder.png", "roofline.png"}
    assert all(p.stat().st_size > 1000 for p in written)


def test_quality_table_keeps_order_and_marks_peers():
    """`benchmarks.quality --only` rebuilds the table from stored rows: kiln's configurations in
    CONFIGS order (whatever order they were measured in), then peers, whose bits carry the star."""
    from benchmarks import quality

    entry = {"bits_per_weight": 4.5, "size_mb": 80.0, "size_ratio": 0.148, "ppl": 34.0, "ppl_increase": 0.1,
             "kl": 0.12, "top1": 0.8, "greedy_prefix": 0.1, "greedy_identical": 0}
    first, last = list(quality.CONFIGS)[0], list(quality.CONFIGS)[-1]
    raw = {"llama.cpp Qx": {**entry, "peer": "x.gguf"}, last: {**entry, "bits_note": ""},
           first: {**entry, "ppl_increase": None, "kl": None, "top1": None}}
    rows = quality.table_rows(raw)
    assert [r.split(" | ")[0] for r in rows] == [f"| {first}", f"| {last}", "| llama.cpp Qx"]
    assert " 4.50* " in rows[2] and " 4.50 " in rows[1] and "+10.0%" in rows[1] and "| — |" in rows[0]

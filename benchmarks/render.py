"""The speed benchmark's Markdown: the speed-llm, speed-encoder and roofline sections of RESULTS.md,
from the results record (`benchmarks/results.json`), and the clean-up of an unsectioned RESULTS.md."""

from __future__ import annotations

from pathlib import Path

from benchmarks.timing import COOL_DOWN_S


def _tuning_lines(specs: dict) -> list[str]:
    """What a TVM artifact's kernels were scheduled by: its tuning is part of its result."""
    return [f"{name}: {t['tasks_with_record']} of {t['tasks']} kernels from MetaSchedule records in the tuning "
            f"database ({t['trials']} trials in this compile), the rest by kiln's matmul rule and DLight's CPU rules; "
            f"TVM build {t['build_seconds']} s." for name, spec in specs.items() if (t := spec.get("tuning"))]


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}×" if a and b else "-"


def llm_section(data: dict, command: str) -> str:
    plan = data["plan"]
    prompts, depths = plan["prompts"], plan["depths"]
    lines = [
        "## Speed: SmolLM2-135M-Instruct",
        "",
        f"Produced by `{command}` on {data['date']}.",
        "",
        data["machine_line"],
        "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".",
        "",
        ("Batch 1, greedy, identical prompt token ids for every system. Runs interleaved (A, B, C, A, B, C, ...), "
        f"{COOL_DOWN_S} s idle between systems, one warm-up round, medians of {plan['repeats']}. Decode tok/s at depth d: "
        f"{plan['decode_tokens']} steps after a d-token prompt (depth 0: a one-token prompt); ort-raw-fp32 has no KV "
        f"cache and recomputes the sequence per token, so it is timed over {plan['raw_decode_tokens']} steps. kiln-tvm-fp32 "
        "has a 256-slot static cache: '-' marks what does not fit (its peak RSS uses a 240-token prompt). "
        "Peak RSS: the system alone in a child process "
        "(load, 512-token prefill, 16 decode steps). Compile: kiln's compile time (export cached), the export time for "
        "ort-raw, the builder's time for onnxruntime-genai, the re-quantization for llama.cpp Q4_0. Greedy: tokens "
        f"identical to PyTorch's before the first difference, after the {max(depths)}-token prompt."),
        "This is a shared 2-core VM: read the ratios, not the absolute numbers.",
        *_tuning_lines(data["specs"]),
    ]
    if data.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in data["skipped"].items()) + "."]
    for threads, results in data["llm"].items():
        lines += ["", f"### {threads} thread{'s' if threads != '1' else ''}", "",
                  "| system | size MB | compile s | peak RSS MB | "
                  + " | ".join(f"TTFT ms @{p}" for p in prompts) + " | "
                  + " | ".join(f"prefill tok/s @{p}" for p in prompts) + " | "
                  + " | ".join(f"decode tok/s @{d}" for d in depths) + " | greedy = PyTorch |",
                  "|---" * (5 + 2 * len(prompts) + len(depths)) + "|"]
        for name, r in results.items():
            info = data["specs"].get(name, {})
            lines.append(f"| {name} | {r['size_mb']} | {_fmt(info.get('compile_s'))} | {_fmt(data['rss'].get(name))} | "
                         + " | ".join(_fmt(r[f"ttft_ms_{p}"]) for p in prompts) + " | "
                         + " | ".join(_fmt(r[f"prefill_tok_s_{p}"]) for p in prompts) + " | "
                         + " | ".join(_fmt(r[f"decode_tok_s_{d}"]) for d in depths) + f" | {r['greedy_same_as_pytorch']} |")
        kilns = [k for k in results if k.startswith("kiln-")]
        peers = [k for k in results if not k.startswith("kiln-")]
        if kilns and peers:
            p_mid = prompts[len(prompts) // 2]
            cols = [(f"decode @{d}", f"decode_tok_s_{d}") for d in depths] + [(f"prefill @{p_mid}", f"prefill_tok_s_{p_mid}")]
            lines += ["", f"Ratios, {threads} thread{'s' if threads != '1' else ''}: kiln's tok/s ÷ the peer's (above 1: kiln is faster).", "",
                      "| peer | " + " | ".join(f"{k.removeprefix('kiln-ort-')} {c}" for k in kilns for c, _ in cols) + " |",
                      "|---" * (1 + len(kilns) * len(cols)) + "|"]
            for peer in peers:
                lines.append(f"| {peer} | " + " | ".join(_ratio(results[k][key], results[peer][key])
                                                         for k in kilns for _, key in cols) + " |")
    lines += ["", "Raw numbers: `benchmarks/results.json`. Plots: `benchmarks/plots/`."]
    return "\n".join(lines)


def encoder_section(data: dict) -> str:
    plan = data["plan"]
    lines = ["## Speed: all-MiniLM-L6-v2", "",
             ("Same harness: identical token ids, interleaved rounds, one warm-up, medians of "
             f"{plan['repeats']}. Latency: batch 1; throughput: sequences per second at batch 32 × 128 tokens. "
             "Ratios per kiln system: the peer's latency ÷ kiln's, and kiln's throughput ÷ the peer's "
             "(above 1: kiln is faster)."), *_tuning_lines(data["encoder_specs"]), ""]
    for threads, results in data["encoder"].items():
        kilns = [k for k in results if k.startswith("kiln-")]
        lines += [f"### {threads} thread{'s' if threads != '1' else ''}", "",
                  "| system | size MB | compile s | peak RSS MB | latency ms b1 s16 | latency ms b1 s128 | seq/s b32 s128 | "
                  + " | ".join(f"{k.removeprefix('kiln-ort-')} ratio: latency s128 | {k.removeprefix('kiln-ort-')} ratio: "
                               "throughput" for k in kilns) + " |",
                  "|---" * (7 + 2 * len(kilns)) + "|"]
        for name, r in results.items():
            info = data["encoder_specs"].get(name, {})
            ratios = " | ".join(f"{_ratio(r['latency_b1_s128_ms'], results[k]['latency_b1_s128_ms'])} | "
                                f"{_ratio(results[k]['throughput_b32_s128_seq_s'], r['throughput_b32_s128_seq_s'])}"
                                for k in kilns)
            lines.append(f"| {name} | {r['size_mb']} | {_fmt(info.get('compile_s'))} | {_fmt(data['encoder_rss'].get(name))} | "
                         f"{r['latency_b1_s16_ms']:.2f} | {r['latency_b1_s128_ms']:.2f} | {r['throughput_b32_s128_seq_s']} | "
                         f"{ratios} |")
        lines.append("")
    lines.append(data["machine_line"])
    return "\n".join(lines)


def roofline_section(data: dict) -> str:
    plan = data["plan"]
    p = max(plan["prompts"])
    lines = ["## Roofline", "",
             ("Ceilings measured in the same run (`kiln.roofline`): read bandwidth = a max-reduction over a 512 MB float32 "
             "array split across the threads (best of 5); compute = numpy's sgemm at 2048³ (best of 5): numpy's BLAS is "
             "the FLOP/s ceiling used. Per token, from the graph without running it (`kiln inspect` prints the same): "
             "weight bytes read (matmul weights whole, one embedding row), KV bytes read at the depth, FLOPs = 2 × matmul "
             "parameters + attention. Decode fraction = (bytes ÷ bandwidth, or FLOPs ÷ peak when compute bound) ÷ the "
             f"measured time per token; prefill fraction = achieved FLOP/s at {p} tokens ÷ peak. PyTorch is counted with "
             "the fp32 weights, llama.cpp from its GGUF tensors (f16 KV cache)."), ""]
    for threads, block in data["roofline"].items():
        c = block["ceiling"]
        lines += [(f"### {threads} thread{'s' if threads != '1' else ''}: {c['bandwidth_gb_s']} GB/s read, "
                  f"{c['flops_gflop_s']} GFLOP/s sgemm (balance {c['flops_gflop_s'] / c['bandwidth_gb_s']:.1f} FLOP/byte)"), "",
                  "| system | weight MB/token | GFLOP/token | "
                  + " | ".join(f"decode @{d}: MB/token, bound, ceiling tok/s, measured, fraction" for d in plan["depths"])
                  + f" | prefill @{p}: GFLOP/s, fraction of peak |",
                  "|---" * (3 + len(plan["depths"]) + 1) + "|"]
        for name, row in block["systems"].items():
            cells = []
            for d in plan["depths"]:
                x = row.get(f"decode_{d}")
                cells.append(f"{x['mb_per_token']}, {x['bound']}, {x['ceiling_tok_s']}, {x['measured_tok_s']}, "
                             f"{100 * x['fraction']:.0f}%" if x else "-")
            pre = row.get(f"prefill_{p}")
            lines.append(f"| {name} | {row['weight_mb_per_token']} | {row['gflop_per_token']} | " + " | ".join(cells)
                         + (f" | {pre['gflop_s']}, {100 * pre['fraction_of_peak']:.0f}% |" if pre else " | - |"))
        lines.append("")
    lines.append(data["machine_line"])
    return "\n".join(lines)


def remove_unsectioned(path: Path) -> None:
    """The first version of this script wrote RESULTS.md whole: drop that text before the sections."""
    if not path.exists():
        return
    text = path.read_text()
    marker = "<!-- "
    head, sep, rest = text.partition(marker)
    if "| system |" in head:
        path.write_text("# Benchmark results\n\n" + sep + rest if sep else "# Benchmark results\n")

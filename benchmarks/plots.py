"""PNG plots of the benchmark results (benchmarks/results.json), beside RESULTS.md.

    python -m benchmarks.plots        # redraw from benchmarks/results.json (and quality/compression JSON)

- speed.png: prefill and decode tok/s per system, one bar per thread count;
- encoder.png: MiniLM latency and throughput per system;
- roofline.png: the machine's roofline (bandwidth slope, sgemm ceiling) with each system's decode
  and prefill points at their arithmetic intensity;
- pareto.png: artifact size vs perplexity increase for the SmolLM2 configurations in
  benchmarks/quality.json (per-config size_mb, ppl_increase) and benchmarks/compression.json,
  with the Pareto front; skipped while neither has SmolLM2 numbers.
Needs matplotlib (skipped with a message when it is not installed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, groups: dict[str, dict[str, float]], title: str, ylabel: str) -> None:
    """groups: series label -> {system: value}; one bar per series within each system."""
    systems = list(dict.fromkeys(s for series in groups.values() for s in series))
    width = 0.8 / max(len(groups), 1)
    for i, (label, series) in enumerate(groups.items()):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(systems))]
        ys = [series.get(s, 0) for s in systems]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
    ax.set_xticks(range(len(systems)))
    ax.set_xticklabels(systems, rotation=35, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def speed_plot(plt, data: dict, path: Path) -> None:
    plan = data["plan"]
    p = max(plan["prompts"])
    fig, axes = plt.subplots(1, 1 + len(plan["depths"]), figsize=(5.5 * (1 + len(plan["depths"])), 4.5))
    panels = [(f"prefill tok/s, {p}-token prompt", f"prefill_tok_s_{p}")]
    panels += [(f"decode tok/s at KV depth {d}", f"decode_tok_s_{d}") for d in plan["depths"]]
    for ax, (title, key) in zip(axes, panels):
        groups = {f"{t} thread{'s' if t != '1' else ''}": {n: r[key] for n, r in res.items() if r.get(key) is not None}
                  for t, res in data["llm"].items()}
        _bars(ax, groups, title, "tokens / s")
    fig.suptitle("SmolLM2-135M, batch 1 (higher is better)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def encoder_plot(plt, data: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    lat = {f"{t} thr": {n: r["latency_b1_s128_ms"] for n, r in res.items()} for t, res in data["encoder"].items()}
    thr = {f"{t} thr": {n: r["throughput_b32_s128_seq_s"] for n, r in res.items()} for t, res in data["encoder"].items()}
    _bars(axes[0], lat, "latency, batch 1 x 128 tokens (lower is better)", "ms")
    _bars(axes[1], thr, "throughput, batch 32 x 128 tokens (higher is better)", "sequences / s")
    fig.suptitle("all-MiniLM-L6-v2", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def roofline_plot(plt, data: dict, path: Path) -> None:
    threads, block = next(iter(data["roofline"].items()))
    c = block["ceiling"]
    bw, peak = c["bandwidth_gb_s"], c["flops_gflop_s"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [2 ** (k / 4) for k in range(-16, 48)]
    ax.plot(xs, [min(peak, bw * x) for x in xs], color="black", lw=1.5)
    ax.annotate(f"{bw} GB/s read", (xs[4], bw * xs[4] * 1.3), fontsize=8, rotation=30)
    ax.annotate(f"{peak} GFLOP/s sgemm", (xs[-20], peak * 1.1), fontsize=8)
    p = max(data["plan"]["prompts"])
    d = max(data["plan"]["depths"])
    markers = iter("os^vDP*Xhp<>")
    for name, row in block["systems"].items():
        m = next(markers, "o")
        x, pre = row.get(f"decode_{d}"), row.get(f"prefill_{p}")
        if x is None or pre is None:  # a system that cannot run that long (a static cache)
            continue
        ax.scatter([x["intensity"]], [x["measured_tok_s"] * x["gflop_per_token"]], marker=m, label=f"{name} decode @{d}")
        ax.scatter([pre["intensity"]], [pre["gflop_s"]], marker=m, facecolors="none",
                   edgecolors=ax.collections[-1].get_facecolor(), label=f"{name} prefill {p}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=10)
    ax.set_xlabel("arithmetic intensity (FLOP / byte read)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"Roofline, {threads} thread(s): filled = decode, hollow = prefill", fontsize=10)
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_points(quality: dict | None, compression: dict | None) -> list[tuple[str, float, float]]:
    """(label, size MB, perplexity increase %) for every SmolLM2 configuration with both numbers."""
    points = []
    for configs in (quality or {}).values():
        if not isinstance(configs, dict):
            continue
        for name, r in configs.items():
            if isinstance(r, dict) and r.get("size_mb") is not None and r.get("ppl_increase") is not None:
                points.append((f"{name}", float(r["size_mb"]), 100 * float(r["ppl_increase"])))
    fp32 = (compression or {}).get("fp32") or {}
    if not points and fp32.get("size_mb") and compression.get("configs"):
        points.append(("fp32", float(fp32["size_mb"]), 0.0))
    for name, r in ((compression or {}).get("configs") or {}).items():
        if r.get("size_mb") is not None and r.get("ppl") and r.get("ref_ppl"):
            points.append((f"{name} (structural)", float(r["size_mb"]), 100 * (r["ppl"] / r["ref_ppl"] - 1)))
    return points


def pareto_front(points: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The points no other point beats on both size and perplexity increase, by size."""
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p[1], p[2])):
        if p[2] < best:
            front.append(p)
            best = p[2]
    return front


def pareto_plot(plt, points, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    front = pareto_front(points)
    ax.scatter([p[1] for p in points], [p[2] for p in points], color="tab:blue", s=18)
    ax.plot([p[1] for p in front], [p[2] for p in front], color="tab:red", lw=1, label="Pareto front")
    for label, x, y in points:
        ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("artifact size (MB)")
    ax.set_ylabel("perplexity increase vs fp32 (%)")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_title("SmolLM2-135M: size vs ΔPPL (lower left is better)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def make_plots(data: dict, out: Path, quality: Path = HERE / "quality.json",
               compression: Path = HERE / "compression.json") -> list[Path]:
    plt = _pyplot()
    if plt is None:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, ok, draw in (("speed.png", bool(data.get("llm")), lambda p: speed_plot(plt, data, p)),
                           ("encoder.png", bool(data.get("encoder")), lambda p: encoder_plot(plt, data, p)),
                           ("roofline.png", bool(data.get("roofline")), lambda p: roofline_plot(plt, data, p))):
        if ok:
            draw(out / name)
            written.append(out / name)
    points = pareto_points(_read(quality), _read(compression))
    if points:
        pareto_plot(plt, points, out / "pareto.png")
        written.append(out / "pareto.png")
    else:
        print("pareto.png skipped: no SmolLM2 size/perplexity numbers yet in benchmarks/quality.json or compression.json")
    if written:
        print("plots: " + ", ".join(str(p.relative_to(out.parent.parent)) if p.is_relative_to(out.parent.parent) else str(p)
                                    for p in written))
    return written


def main() -> int:
    data = _read(HERE / "results.json")
    if not data or "llm" not in data:
        print("no benchmarks/results.json from this version of benchmarks.run: run `python -m benchmarks.run` first")
        return 1
    make_plots(data, HERE / "plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())

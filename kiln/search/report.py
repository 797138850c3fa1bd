"""A search's results: the Pareto front of size, speed and quality, `pareto.md` and two plots.

A trial is on the front when it met every budget and no other such trial is at least as good in
size (smaller), speed (faster) and quality (lower perplexity increase, or higher cosine) and better
in one. The best trial is the front's best by the objective (ties: better quality, then smaller).
"""

from __future__ import annotations

import re
from pathlib import Path

from kiln.search.space import describe
from kiln.search.trial import SPEED_KEY


def quality_of(record: dict) -> float:
    """Higher is better: minus the perplexity increase (LLMs), or the mean cosine (encoders)."""
    q = record["quality"]
    return -q["ppl_increase"] if "ppl_increase" in q else q["cosine_mean"]


def speed_of(record: dict) -> float:
    return record["speed"][SPEED_KEY[record["task"]]]


def _dominates(a: dict, b: dict) -> bool:
    ka = (-a["size_mb"], speed_of(a), quality_of(a))
    kb = (-b["size_mb"], speed_of(b), quality_of(b))
    return all(x >= y for x, y in zip(ka, kb)) and ka != kb


def pareto_front(records: list[dict]) -> list[dict]:
    feasible = [r for r in records if r["status"] == "ok" and r.get("duplicate_of") is None]
    return [r for r in feasible if not any(_dominates(o, r) for o in feasible if o is not r)]


def choose_best(front: list[dict], objective: str) -> dict | None:
    key = {"size": lambda r: (r["size_mb"], -quality_of(r)),
           "speed": lambda r: (-speed_of(r), -quality_of(r), r["size_mb"]),
           "quality": lambda r: (-quality_of(r), r["size_mb"])}[objective]
    return min(front, key=key) if front else None


def _quality_text(record: dict) -> str:
    q = record.get("quality") or {}
    if "ppl_increase" in q:
        return f"{q['perplexity']:.3f} ({q['ppl_increase']:+.2%})"
    if "cosine_mean" in q:
        return f"{q['cosine_mean']:.4f} (nn {q['nearest_neighbour_agreement']:.0%})"
    return ""


def write_report(output: Path, reference: dict, records: list[dict], settings: dict, space_name: str) -> dict | None:
    front = pareto_front(records)
    best = choose_best(front, settings["objective"])
    on_front = {r["number"] for r in front}
    task = reference["task"]
    quality_head = "perplexity (increase)" if task == "causal-lm" else "cosine (nn agreement)"
    speed_head = "decode tok/s" if task == "causal-lm" else "seq/s (32 x 128)"
    budgets = []
    if settings["max_size_mb"] is not None:
        budgets.append(f"size <= {settings['max_size_mb']:g} MB")
    if settings["max_ppl_increase"] is not None:
        budgets.append(f"perplexity increase <= {100 * settings['max_ppl_increase']:g}%")
    if settings["min_cosine"] is not None:
        budgets.append(f"mean cosine >= {settings['min_cosine']:g}")
    distinct = [r for r in records if r.get("duplicate_of") is None]
    counts = {s: sum(r["status"] == s for r in distinct) for s in ("ok", "pruned", "failed")}
    repeats = len(records) - len(distinct)
    lines = [f"# kiln search: {Path(settings['model']).name}", "",
             f"Space `{space_name}`, objective **{settings['objective']}**, budgets: {', '.join(budgets) or 'none'}; "
             f"evaluated on the {settings['corpus']} text. {len(distinct)} recipes measured: {counts['ok']} within "
             f"budget, {counts['pruned']} over a budget, {counts['failed']} failed"
             + (f" ({repeats} repeated recipes reused their records)." if repeats else "."), ""]
    if best is not None:
        lines += [f"Best: trial {best['number']} (`best.toml`, artifact in `best/`).", ""]
    else:
        lines += ["No trial met every budget.", ""]
    lines += [f"| trial | status | Pareto | size MB | {quality_head} | {speed_head} | seconds | choices / reason |",
              "|---|---|---|---|---|---|---|---|"]
    rows = [dict(reference, number="ref", status="fp32", params={}), *records]
    for r in rows:
        speed = f"{speed_of(r):g}" if r.get("speed") and r.get("task") else ""
        size = f"{r['size_mb']:.1f}" if r.get("size_mb") is not None else ""
        # a pipeline error names every pass before it: the table keeps the pass and the verdict
        what = re.sub(r" \(after [^)]*\)", "", r.get("reason") or "") if r["status"] != "ok" else _choices(r)
        if r.get("duplicate_of") is not None:
            what = f"same recipe as trial {r['duplicate_of']}"
        mark = "**best**" if best is not None and r is best else "yes" if r["number"] in on_front else ""
        seconds = (r.get("seconds") or {}).get("total", "")
        lines.append(f"| {r['number']} | {r['status']} | {mark} | {size} | {_quality_text(r)} | {speed} | {seconds} | "
                     f"{what.replace('|', '/')} |")
    (output / "pareto.md").write_text("\n".join(lines) + "\n")
    _plots(output, [r for r in records if r["status"] == "ok"], on_front, reference, quality_head, speed_head)
    return best


def _choices(record: dict) -> str:
    return describe(record.get("params") or {})


def _plots(output: Path, measured: list[dict], on_front: set, reference: dict, quality_head: str,
           speed_head: str) -> None:
    """pareto-size.png (size against quality) and pareto-speed.png (speed against quality)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, x_of, x_label in (("size", lambda r: r["size_mb"], "size (MB)"),
                                ("speed", speed_of, speed_head)):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for group, colour, label in (([r for r in measured if r["number"] not in on_front], "#999999", "within budget"),
                                     ([r for r in measured if r["number"] in on_front], "#c0392b", "Pareto front")):
            if group:
                ax.scatter([x_of(r) for r in group], [quality_of(r) for r in group], c=colour, label=label)
        if reference.get("speed"):
            ax.scatter([x_of(reference)], [quality_of(reference)], marker="*", s=160, c="#2c3e50", label="fp32 reference")
        for r in measured:
            ax.annotate(str(r["number"]), (x_of(r), quality_of(r)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(x_label)
        ax.set_ylabel("- perplexity increase" if "perplexity" in quality_head else "mean cosine")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(output / f"pareto-{name}.png")
        plt.close(fig)

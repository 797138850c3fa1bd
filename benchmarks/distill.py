"""Distillation after structural compression: how much of the loss a cut costs it wins back.

    python -m benchmarks.distill [--plan "mlp-width:20;layers:20"] [--steps 300] [--lr 5e-5] [--rank 0]
                                 [--calibration-windows 256] [--windows 10] [--corpus newsgroups]
                                 [--pruned-int4] [--minilm] [--workdir DIR] [--threads 2]

For each method and level (percent of SmolLM2's parameters removed, as in
`benchmarks.compression`) it compiles two artifacts with the same calibration text: the cut
alone (fp32 recipe plus the structural pass before the KV cache), and the cut followed by the
`distill` pass (KL to the source's next-token distribution on `--calibration-windows` windows of
256 tokens of kiln's calibration text). Both are measured against the fp32 artifact on
`--corpus` (newsgroups by default: e-mail English, unlike the calibration text): perplexity,
KL, top-1, size, decode tok/s (`kiln bench`, 64 + 64 tokens), and the compile time. Recovered
= (PPL cut − PPL distilled) / (PPL cut − PPL fp32).

`--pruned-int4` adds the `pruned-int4-distill` preset; `--minilm` MiniLM-L6 at 25% fewer
parameters by low rank, with and without distillation of the pooled embeddings (cosine loss),
measured by cosine and nearest-neighbour agreement against fp32 on 200 Lee sentences.

Artifacts stay in the workdir (a second run reuses them). The table goes to
benchmarks/RESULTS.md between `<!-- distill:begin -->` and `<!-- distill:end -->`; raw numbers to
benchmarks/distill.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from benchmarks.compression import CLEANUP, METHODS, TAIL, _cell, compile_once, size_mb, write_recipe
from benchmarks.report import write_section
from kiln.recipes import PRESETS_DIR

ROOT = Path(__file__).resolve().parents[1]


def measure(path: Path, reference, corpus: Path, windows: int, threads: int) -> dict:
    import kiln
    from kiln.bench import bench_llm
    from kiln.evaluate import evaluate_lm

    art = kiln.load(path, threads=threads)
    report = evaluate_lm(art, corpus, max_windows=windows, reference=reference)
    speed = bench_llm(art, prompt_tokens=64, new_tokens=64, repeats=3)
    return {"ppl": round(report.perplexity, 3), "kl": round(report.kl or 0.0, 4),
            "top1": round(report.top1_agreement if report.top1_agreement is not None else 1.0, 4),
            "decode_tok_s": speed["decode_tok_s"], "size_mb": size_mb(path)}


def distill_record(manifest: dict) -> dict | None:
    record = next((r for r in manifest["passes"] if r["name"] == "distill"), None)
    if record is None:
        return None
    s = record["stats"]
    return {"seconds": record["seconds"], "modified": record["modified"], "steps": s.get("steps"),
            "params_trained": s.get("params_trained"), "heldout_before": s.get("loss_heldout_before"),
            "heldout_after": s.get("loss_heldout_after"), "curve": s.get("loss_curve")}


def main(argv=None) -> int:
    import kiln
    from kiln.corpus import EVAL_CORPORA

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default="mlp-width:20;layers:20", help="method:levels;... (benchmarks.compression's)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--calibration-windows", type=int, default=256)
    ap.add_argument("--windows", type=int, default=10, help="evaluation windows of 512 tokens")
    ap.add_argument("--corpus", default="newsgroups", choices=sorted(EVAL_CORPORA))
    ap.add_argument("--pruned-int4", action="store_true")
    ap.add_argument("--minilm", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-distill"))
    args = ap.parse_args(argv)
    work = args.workdir
    (work / "recipes").mkdir(parents=True, exist_ok=True)
    corpus = EVAL_CORPORA[args.corpus]()
    results_path = ROOT / "benchmarks" / "distill.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("configs", {})
    results["settings"] = {"steps": args.steps, "lr": args.lr, "rank": args.rank, "corpus": args.corpus,
                           "calibration_windows": args.calibration_windows, "windows": args.windows}

    def log(msg: str) -> None:
        print(msg, flush=True)

    def save() -> None:
        results["date"] = datetime.date.today().isoformat()
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    fp32_dir = work / "smollm2-fp32"
    fp32 = compile_once("smollm2-135m", fp32_dir, PRESETS_DIR / "fp32.toml", log, timed=True)
    if "error" in fp32:
        raise SystemExit(f"fp32 reference failed: {fp32['error']}")
    reference = kiln.load(fp32_dir, threads=args.threads)
    results["fp32"] = {**measure(fp32_dir, None, corpus, args.windows, args.threads),
                       "params": fp32["manifest"]["summary"]["artifact"]["parameters"]}
    log(f"fp32: {results['fp32']}")
    save()
    distill = ("distill", {"steps": args.steps, "lr": args.lr, "rank": args.rank})
    windows = {"calibration_windows": args.calibration_windows}

    plan = [(m.split(":")[0], [int(x) for x in m.split(":")[1].split(",") if x]) for m in args.plan.split(";") if m]
    for method, levels in plan:
        pass_name, extra = METHODS[method]
        for level in levels:
            key = f"{method}-{level}"
            cut = (pass_name, {"target_params": round(1 - level / 100, 4), **extra, "budget": 100.0})
            entry = {"method": method, "level": level}
            for variant, steps in (("cut", [cut]), ("distilled", [cut, distill])):
                name = f"{key}-{variant}"
                recipe = write_recipe(work / "recipes" / f"{name}.toml", name, [(n, {}) for n in CLEANUP] + steps + TAIL,
                                      top=windows)
                got = compile_once("smollm2-135m", work / f"smollm2-{name}", recipe, log, timed=True)
                if "error" in got:
                    entry[variant] = {"error": got["error"]}
                    continue
                entry[variant] = {"compile_s": got["seconds"], "params": got["manifest"]["summary"]["artifact"]["parameters"],
                                  "distill": distill_record(got["manifest"]),
                                  **measure(work / f"smollm2-{name}", reference, corpus, args.windows, args.threads)}
                log(f"{name}: {entry[variant]}")
            results["configs"][key] = entry
            save()

    if args.pruned_int4:
        entry = {}
        for variant, preset in (("cut", "pruned-int4"), ("distilled", "pruned-int4-distill")):
            got = compile_once("smollm2-135m", work / f"smollm2-{preset}", PRESETS_DIR / f"{preset}.toml", log, timed=True)
            entry[variant] = {"error": got["error"]} if "error" in got else {
                "compile_s": got["seconds"], "distill": distill_record(got["manifest"]),
                **measure(work / f"smollm2-{preset}", reference, corpus, args.windows, args.threads)}
            log(f"{preset}: {entry[variant]}")
        results["pruned_int4"] = entry
        save()
    if args.minilm:
        results["minilm"] = minilm(work, args, log)
        save()
    write_table(results, ROOT / "benchmarks" / "RESULTS.md")
    return 0


def minilm(work: Path, args, log) -> dict:
    import kiln
    from kiln.evaluate import evaluate_encoder

    ref_dir = work / "minilm-fp32"
    got = compile_once("minilm-l6", ref_dir, PRESETS_DIR / "fp32.toml", log, timed=True)
    if "error" in got:
        return {"error": got["error"]}
    ref = kiln.load(ref_dir)
    cut = ("factorize-low-rank", {"target_params": 0.75, "activation_aware": True, "metric": "cosine", "budget": 0.0})
    distill = ("distill", {"steps": args.steps, "lr": 1e-4, "metric": "cosine", "budget": 0.0})
    out = {}
    for variant, steps in (("cut", [cut]), ("distilled", [cut, distill])):
        name = f"minilm-lowrank-25-{variant}"
        recipe = write_recipe(work / "recipes" / f"{name}.toml", name, [(n, {}) for n in CLEANUP] + steps + TAIL,
                              top={"calibration_windows": args.calibration_windows})
        got = compile_once("minilm-l6", work / name, recipe, log, timed=True)
        if "error" in got:
            out[variant] = {"error": got["error"]}
            continue
        report = evaluate_encoder(kiln.load(work / name), ref)
        out[variant] = {"compile_s": got["seconds"], "params": got["manifest"]["summary"]["artifact"]["parameters"],
                        "size_mb": size_mb(work / name), "cosine_mean": round(report.cosine_mean, 4),
                        "cosine_min": round(report.cosine_min, 4),
                        "nn_agreement": round(report.nearest_neighbour_agreement, 4),
                        "distill": distill_record(got["manifest"])}
        log(f"{name}: {out[variant]}")
    out["fp32_params"] = got.get("manifest", {}).get("summary", {}).get("source", {}).get("parameters")
    return out


def _recovered(fp: float, cut: float, healed: float) -> str:
    return f"{(cut - healed) / (cut - fp):.0%}" if cut > fp else "—"


def write_table(results: dict, path: Path) -> None:
    fp, s = results["fp32"], results["settings"]
    trained = "whole weights" if not s["rank"] else f"rank-{s['rank']} deltas"
    lines = ["## Distillation after structural compression (SmolLM2-135M, MiniLM-L6)", "",
             (f"Produced by `python -m benchmarks.distill --steps {s['steps']} --lr {s['lr']} --rank {s['rank']} "
              f"--calibration-windows {s['calibration_windows']}` on {results.get('date')}; raw numbers in "
              "`benchmarks/distill.json`. Each pair: the same cut (one structural pass, same calibration text), then "
              f"without and with the `distill` pass ({s['steps']} steps of one 256-token window, AdamW, lr {s['lr']}, "
              f"{trained}, KL to the source). PPL on "
              f"{s['corpus']} ({s['windows']} windows of 512 tokens, never calibration text), KL and top-1 against fp32; "
              "decode tok/s from `kiln bench` (64 + 64 tokens, 2 threads, a shared 2-core VM); compile time on this VM."),
             "", "| method | level | params (M) | size MB | PPL cut | PPL distilled | recovered | KL cut → distilled | "
                 "top-1 cut → distilled | decode tok/s | compile s (cut / distilled) | held-out KL in distill |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| fp32 | — | {fp['params'] / 1e6:.1f} | {fp['size_mb']} | {fp['ppl']} | — | — | — | — | "
             f"{fp['decode_tok_s']} | — | — |"]
    for key, c in results["configs"].items():
        cut, dist = c.get("cut", {}), c.get("distilled", {})
        if "error" in cut or "error" in dist:
            lines.append(f"| {c['method']} | {c['level']}% | — | — | — | — | — | — | — | — | — | "
                         f"{_cell(cut.get('error') or dist.get('error'))} |")
            continue
        d = dist.get("distill") or {}
        lines.append(f"| {c['method']} | {c['level']}% | {cut['params'] / 1e6:.1f} | {cut['size_mb']} | {cut['ppl']} | "
                     f"{dist['ppl']} | {_recovered(fp['ppl'], cut['ppl'], dist['ppl'])} | {cut['kl']} → {dist['kl']} | "
                     f"{cut['top1']} → {dist['top1']} | {cut['decode_tok_s']} / {dist['decode_tok_s']} | "
                     f"{cut['compile_s']:.0f} / {dist['compile_s']:.0f} | {d.get('heldout_before')} → {d.get('heldout_after')} |")
    p = results.get("pruned_int4")
    if p and "error" not in p.get("cut", {}) and "error" not in p.get("distilled", {}):
        cut, dist = p["cut"], p["distilled"]
        lines += ["", (f"`pruned-int4` → `pruned-int4-distill` (the same pruning, distilled before GPTQ int4): "
                       f"{cut['size_mb']} → {dist['size_mb']} MB ({dist['size_mb'] / fp['size_mb']:.3f}× fp32), PPL "
                       f"{cut['ppl']} → {dist['ppl']} ({cut['ppl'] / fp['ppl'] - 1:+.1%} → {dist['ppl'] / fp['ppl'] - 1:+.1%} "
                       f"against fp32 {fp['ppl']}), KL {cut['kl']} → {dist['kl']}, decode {cut['decode_tok_s']} → "
                       f"{dist['decode_tok_s']} tok/s, compile {cut['compile_s']:.0f} → {dist['compile_s']:.0f} s.")]
    m = results.get("minilm")
    if m and "error" not in m.get("cut", {}) and "error" not in m.get("distilled", {}):
        cut, dist = m["cut"], m["distilled"]
        lines += ["", (f"MiniLM-L6, low rank to 75% of the parameters ({cut['params'] / 1e6:.1f}M, {cut['size_mb']} MB), "
                       f"then distillation of the pooled embeddings (cosine loss): cosine to fp32 {cut['cosine_mean']} → "
                       f"{dist['cosine_mean']} (min {cut['cosine_min']} → {dist['cosine_min']}), nearest-neighbour "
                       f"agreement {cut['nn_agreement']} → {dist['nn_agreement']}, compile {cut['compile_s']:.0f} → "
                       f"{dist['compile_s']:.0f} s.")]
    write_section("distill", "\n".join(lines), path)
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())

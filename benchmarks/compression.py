"""Structural compression of SmolLM2 (and MiniLM): quality, size and speed per method and level.

    python -m benchmarks.compression [--plan "layers:10,20,30;mlp-width:10,20,30;low-rank:10,20,30;heads:0,10,20,30;heads-group:10"]
                                     [--windows 4] [--workdir DIR] [--threads 2] [--speed-rounds 3]
                                     [--no-compose] [--no-minilm]

For each method and level it compiles SmolLM2 with the fp32 recipe plus one structural pass
(before the KV cache and packing) asked for `target_params = 1 - level` (the fraction of the
model's parameters to keep, embeddings included), then measures against the fp32 artifact:
perplexity on the Lee corpus (`kiln.evaluate`, `--windows` windows of 512 tokens), KL and top-1
agreement, artifact size, and decode tok/s (`kiln.bench`). A level a method cannot reach (heads:
attention holds ~20% of SmolLM2's parameters) is reported with the pass's reason.
Also: pruned + int4 (the `pruned-int4` preset: prune-heads and prune-mlp, then GPTQ int4) with its KV cache,
GroupQueryAttention count and greedy output on 5 prompts; MiniLM at 25% fewer parameters by
low-rank, with cosine against fp32 (`kiln.evaluate.evaluate_encoder`).

Artifacts are kept in the workdir, so a second run reuses them (delete one to recompile it).
The table goes to benchmarks/RESULTS.md between `<!-- compression:begin -->` and
`<!-- compression:end -->` (appended if absent); raw numbers to benchmarks/compression.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

from kiln.recipes import PRESETS_DIR, load_recipe

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- compression:begin -->", "<!-- compression:end -->"

CLEANUP = ["fold-constants", "simplify", "eliminate-common-subexpressions", "fold-constants"]
TAIL = [("insert-kv-cache", {"only_causal_lm": True}), ("pack-matmuls", {}), ("fold-constants", {}),
        ("eliminate-dead-code", {})]
METHODS = {
    "low-rank": ("factorize-low-rank", {"activation_aware": True}),
    "heads": ("prune-heads", {"unit": "query"}),
    "heads-group": ("prune-heads", {"unit": "group"}),  # whole KV groups: past the query-head limit
    "mlp-width": ("prune-mlp", {"allocation": "uniform"}),
    "layers": ("drop-layers", {}),
}
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The three primary colors are",
           "def fibonacci(n):", "Once upon a time, in a small village,"]


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def write_recipe(path: Path, name: str, steps: list[tuple[str, dict]], top: dict | None = None) -> Path:
    """A recipe file: `top` holds recipe-level keys (calibration_windows), `steps` the passes."""
    lines = [f'name = "{name}"', f'description = "benchmarks.compression: {name}"']
    lines += [f"{k} = {_toml_value(v)}" for k, v in (top or {}).items()] + [""]
    for pass_name, params in steps:
        lines.append("[[passes]]")
        lines.append(f'name = "{pass_name}"')
        lines += [f"{k} = {_toml_value(v)}" for k, v in params.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def compile_once(model: str, out: Path, recipe: Path, log, timed: bool = False) -> dict:
    """Compile unless the artifact exists: {"manifest", "reused", "seconds"} or {"error"}. The wall
    time is kept beside the artifact (`<out>.seconds`); with `timed`, an artifact without one is
    compiled again, so that every result has its compile time."""
    import kiln
    from kiln.errors import KilnError
    from kiln.manifest import read_manifest

    times = out.with_name(out.name + ".seconds")
    if (out / "kiln.json").is_file() and (times.is_file() or not timed):
        seconds = float(times.read_text()) if times.is_file() else None
        return {"manifest": read_manifest(out), "reused": True, "seconds": seconds}
    start = time.perf_counter()
    try:
        kiln.compile(model, out, recipe=recipe, progress=False, force=True)
    except KilnError as exc:
        log(f"  {out.name}: {exc}")
        return {"error": str(exc)}
    seconds = round(time.perf_counter() - start, 1)
    times.write_text(str(seconds))
    log(f"  {out.name}: compiled in {seconds:.0f} s")
    return {"manifest": read_manifest(out), "reused": False, "seconds": seconds}


def size_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6, 1)


def structural_record(manifest: dict) -> dict | None:
    names = {p for p, _ in METHODS.values()}
    for r in manifest.get("passes", []):
        if r["name"] in names:
            return r
    return None


def measure_lm(path: Path, reference, windows: int, threads: int) -> dict:
    import kiln
    from kiln.bench import bench_llm
    from kiln.evaluate import evaluate_lm

    art = kiln.load(path, threads=threads)
    report = evaluate_lm(art, max_windows=windows, reference=reference)
    speed = bench_llm(art, prompt_tokens=64, new_tokens=64, repeats=3)
    return {"ppl": round(report.perplexity, 3), "ref_ppl": round(report.reference_perplexity, 3)
            if report.reference_perplexity else None, "kl": round(report.kl, 4) if report.kl is not None else None,
            "top1": round(report.top1_agreement, 4) if report.top1_agreement is not None else None,
            "decode_tok_s": speed["decode_tok_s"], "prefill_tok_s": speed["prefill_tok_s"],
            "size_mb": size_mb(path)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default="layers:10,20,30;mlp-width:10,20,30;low-rank:10,20,30;heads:0,10,20,30;heads-group:10",
                    help="method:levels;... with levels in percent of the parameters removed (heads: 0 = the most "
                         "query heads it can remove)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-compression"))
    ap.add_argument("--no-compose", action="store_true")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--speed-rounds", type=int, default=3,
                    help="decode tok/s measured again at the end, artifacts interleaved, median of this many rounds")
    args = ap.parse_args(argv)
    import kiln

    work = args.workdir
    (work / "recipes").mkdir(parents=True, exist_ok=True)
    results_path = ROOT / "benchmarks" / "compression.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("configs", {})

    def log(msg: str) -> None:
        print(msg, flush=True)

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    fp32_dir = work / "smollm2-fp32"
    fp32 = compile_once("smollm2-135m", fp32_dir, write_recipe(work / "recipes" / "fp32.toml", "fp32",
                                                               [(n, {}) for n in CLEANUP] + TAIL), log)
    if "error" in fp32:
        raise SystemExit(f"fp32 reference failed: {fp32['error']}")
    reference = kiln.load(fp32_dir, threads=args.threads)
    if "fp32" not in results:
        results["fp32"] = {**measure_lm(fp32_dir, None, args.windows, args.threads),
                           "params": fp32["manifest"]["summary"]["artifact"]["parameters"]}
        save()
    log(f"fp32: {results['fp32']}")

    plan = [(m.split(":")[0], [int(x) for x in m.split(":")[1].split(",") if x]) for m in args.plan.split(";") if m]
    for method, levels in plan:
        pass_name, extra = METHODS[method]
        for level in levels:
            key = f"{method}-{level}"
            if key in results["configs"] and (work / f"smollm2-{key}" / "kiln.json").is_file():
                continue
            params = {"target_params": round(1 - level / 100, 4), **extra, "budget": 100.0}
            if level == 0:  # "0" asks heads for the most it can do (one query head per group)
                params = {"ratio": 0.67, **extra, "budget": 100.0}
            recipe = write_recipe(work / "recipes" / f"{key}.toml", key,
                                  [(n, {}) for n in CLEANUP] + [(pass_name, params)] + TAIL)
            out = work / f"smollm2-{key}"
            got = compile_once("smollm2-135m", out, recipe, log)
            if "error" in got:
                results["configs"][key] = {"method": method, "level": level, "error": got["error"]}
            else:
                record = structural_record(got["manifest"])
                results["configs"][key] = {
                    "method": method, "level": level, "pass": pass_name, "params": params,
                    "parameters": got["manifest"]["summary"]["artifact"]["parameters"],
                    "record": {"stats": record["stats"], "delta": record.get("delta"), "seconds": record["seconds"]},
                    "kv_cache": {k: got["manifest"]["kv_cache"][k] for k in ("num_layers", "kv_heads")},
                    **measure_lm(out, reference, args.windows, args.threads)}
            log(f"{key}: {results['configs'][key].get('ppl', results['configs'][key].get('error'))}")
            save()

    if not args.no_compose and "compose" not in results:
        results["compose"] = compose(work, reference, args, log)
        save()
    if not args.no_minilm and "minilm" not in results:
        results["minilm"] = minilm(work, log)
        save()
    if args.speed_rounds:
        speed_phase(results, work, args, log)
    results["date"] = datetime.date.today().isoformat()
    save()
    write_table(results, args, ROOT / "benchmarks" / "RESULTS.md")
    return 0


def speed_phase(results: dict, work: Path, args, log) -> None:
    """Decode tok/s of every SmolLM2 artifact, measured in interleaved rounds (one artifact loaded
    at a time), so load on a shared machine hits all of them alike; medians replace the first numbers."""
    import statistics

    import kiln
    from kiln.bench import bench_llm

    entries = {"fp32": (work / "smollm2-fp32", results["fp32"])}
    entries.update({k: (work / f"smollm2-{k}", c) for k, c in results["configs"].items() if "error" not in c})
    if isinstance(results.get("compose"), dict) and "error" not in results["compose"]:
        entries["compose"] = (work / "smollm2-pruned-int4", results["compose"])
    samples: dict[str, list[float]] = {k: [] for k in entries}
    log(f"speed: {len(entries)} artifacts, {args.speed_rounds} interleaved rounds")
    for round_ in range(args.speed_rounds):
        for key, (path, _) in entries.items():
            art = kiln.load(path, threads=args.threads)
            samples[key].append(bench_llm(art, prompt_tokens=64, new_tokens=64, repeats=1)["decode_tok_s"])
            del art
        log(f"speed round {round_ + 1}/{args.speed_rounds} done")
    for key, (_, entry) in entries.items():
        entry["decode_tok_s"] = round(statistics.median(samples[key]), 1)
        entry["decode_tok_s_samples"] = samples[key]
    results["speed"] = f"interleaved, median of {args.speed_rounds} rounds"


def compose(work: Path, reference, args, log) -> dict:
    """Pruned (heads and MLP width) then int4, with the KV cache and fused GQA; greedy on 5 prompts."""
    import kiln

    out = work / "smollm2-pruned-int4"
    got = compile_once("smollm2-135m", out, PRESETS_DIR / "pruned-int4.toml", log)
    if "error" in got:
        return {"error": got["error"]}
    m = got["manifest"]
    fused = next((r["stats"] for r in m["passes"] if r["name"] == "fuse-attention"), {})
    art = kiln.load(out, threads=args.threads)
    outputs = [{"prompt": p, "output": art.generate(p, max_new_tokens=24).text} for p in PROMPTS]
    removed = sum(r["stats"].get("params_removed") or 0 for r in m["passes"] if r["name"] in ("prune-heads", "prune-mlp"))
    # the model's weights after pruning (the artifact's own count adds the int4 scales)
    return {"size_mb": size_mb(out), "parameters": m["summary"]["source"]["parameters"] - removed,
            "ops": {k: v for k, v in m["summary"]["artifact"]["ops"].items()
                    if k.split("::")[-1] in ("GroupQueryAttention", "MatMulNBits", "MatMul")},
            "gqa_fused": fused.get("gqa_fused"), "kv_cache": m.get("kv_cache", {}).get("num_layers"),
            "kv_heads": m.get("kv_cache", {}).get("kv_heads"),
            "records": [{"name": r["name"], "params_removed": r["stats"].get("params_removed"),
                         "delta_kl": (r.get("delta") or {}).get("kl")} for r in m["passes"]
                        if r["name"] in ("prune-heads", "prune-mlp", "quantize-weights")],
            **measure_lm(out, reference, args.windows, args.threads), "generations": outputs}


def minilm(work: Path, log) -> dict:
    import kiln
    from kiln.evaluate import evaluate_encoder

    ref_dir = work / "minilm-fp32"
    got = compile_once("minilm-l6", ref_dir, write_recipe(work / "recipes" / "minilm-fp32.toml", "fp32",
                                                          [(n, {}) for n in CLEANUP] + TAIL), log)
    if "error" in got:
        return {"error": got["error"]}
    ref = kiln.load(ref_dir)
    total = got["manifest"]["summary"]["artifact"]["parameters"]
    out = {"fp32_params": total}
    from kiln.ir import load_model
    from kiln.passes.analysis.linear import linear_layers, weight_of

    linear = sum(weight_of(n).size for n in linear_layers(load_model(ref_dir / "model.onnx")))
    out["linear_params"] = linear
    # (an "include_embeddings" variant keeps the word table dense: its spectrum is flat, so no rank
    # below the break-even pays for its error; the pass says so in its rejected reasons)
    variants = (("lowrank-25", 0.75, False), ("lowrank-25-of-linear", round(1 - 0.25 * linear / total, 4), False))
    for key, target, embeddings in variants:
        params = {"target_params": target, "activation_aware": True, "include_embeddings": embeddings,
                  "metric": "cosine", "budget": 0.0}
        steps = [(n, {}) for n in CLEANUP] + [("factorize-low-rank", params)] + TAIL
        d = work / f"minilm-{key}"
        got = compile_once("minilm-l6", d, write_recipe(work / "recipes" / f"minilm-{key}.toml", key, steps), log)
        if "error" in got:
            out[key] = {"error": got["error"]}
            continue
        report = evaluate_encoder(kiln.load(d), ref)
        record = structural_record(got["manifest"])
        out[key] = {"parameters": got["manifest"]["summary"]["artifact"]["parameters"], "size_mb": size_mb(d),
                    "cosine_mean": round(report.cosine_mean, 4), "cosine_min": round(report.cosine_min, 4),
                    "nn_agreement": round(report.nearest_neighbour_agreement, 4), "sentences": report.sentences,
                    "record": {"stats": record["stats"], "delta": record.get("delta")}}
        log(f"minilm {key}: {out[key]['cosine_mean']}")
    return out


def _detail(method: str, s: dict) -> str:
    if method == "low-rank":
        return (f"{s.get('layers_factored')} layers factored, ranks {s.get('rank_min')}–{s.get('rank_max')}, "
                f"output error {s.get('output_error_mean')}")
    if method == "heads":
        return f"query heads per layer {s.get('heads_after')}"
    if method == "heads-group":
        return f"query heads per layer {s.get('heads_after')}, KV heads {s.get('kv_heads_after')}"
    if method == "mlp-width":
        return f"width {s.get('width_before')} → {s.get('width_min')}–{s.get('width_max')}"
    return f"dropped {s.get('dropped')} (BI {s.get('block_influence_dropped')})"


def _cell(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1].replace("|", "\\|")


def write_table(results: dict, args, path: Path) -> None:
    fp = results["fp32"]
    lines = [BEGIN, "## Structural compression (SmolLM2-135M, MiniLM-L6)", "",
             (f"Produced by `python -m benchmarks.compression --windows {args.windows}` on {results.get('date')}; "
             "raw numbers in `benchmarks/compression.json`."),
             ("Each row: the fp32 recipe plus one structural pass before the KV cache, asked to keep "
             "`1 - level` of the parameters (embeddings included; SmolLM2 has 134.5M, 28.3M of them the tied embedding). "
             f"PPL on the Lee corpus ({args.windows} windows of 512 tokens), KL and top-1 against the fp32 artifact on the same tokens; "
             f"decode tok/s from `kiln bench` (64-token prompt, 64 new tokens, 2 threads), all artifacts measured {results.get('speed', 'one after another')} (a shared 2-core VM under load from other jobs: compare within the table, not with other sections). "
             "No fine-tuning after compression."), "",
             "| method | level | params (M) | removed | size MB | PPL | ΔPPL | KL | top-1 | decode tok/s | KV layers × heads | pass record (stats) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| fp32 | — | {fp['params'] / 1e6:.1f} | — | {fp['size_mb']} | {fp['ppl']} | — | — | — | {fp['decode_tok_s']} | 30 × 3 | — |"]
    for key, c in sorted(results["configs"].items(), key=lambda kv: (list(METHODS).index(kv[1]["method"]), kv[1]["level"])):
        if "error" in c:
            lines.append(f"| {c['method']} | {c['level'] or 'max'}% | — | — | — | — | — | — | — | — | — | not reachable: {c['error']} |")
            continue
        s = c["record"]["stats"]
        removed = 1 - c["parameters"] / fp["params"]
        detail = _detail(c["method"], s)
        dppl = c["ppl"] - fp["ppl"]
        lines.append(f"| {c['method']} | {c['level'] or 'max'}{'%' if c['level'] else ''} | {c['parameters'] / 1e6:.1f} | {removed:.1%} | {c['size_mb']} | "
                     f"{c['ppl']} | {dppl:+.2f} | {c['kl']} | {c['top1']} | {c['decode_tok_s']} | "
                     f"{c['kv_cache']['num_layers']} × {c['kv_cache']['kv_heads']} | {detail}; sample KL {(c['record']['delta'] or {}).get('kl')} |")
    lines += [f"- {note}" for note in results.get("notes", [])]
    comp = results.get("compose")
    if comp and "error" not in comp:
        lines += ["", "### Pruned + int4",
                  (f"The `pruned-int4` preset: {load_recipe('pruned-int4').description} Lowered by the ORT backend "
                   f"(GroupQueryAttention fused on {comp['gqa_fused']}/30 layers, KV cache {comp['kv_cache']} layers × "
                   f"{comp['kv_heads']} heads):"), "",
                  (f"{comp['parameters'] / 1e6:.1f}M parameters, {comp['size_mb']} MB, PPL {comp['ppl']} (fp32 {fp['ppl']}), "
                  f"KL {comp['kl']}, top-1 {comp['top1']}, decode {comp['decode_tok_s']} tok/s."), "",
                  "Per-pass records (sample KL: the pipeline's check against the stage before): " + "; ".join(
                      (f"`{r['name']}` removed {r['params_removed']:,} parameters" if r["params_removed"] is not None
                       else f"`{r['name']}`") + f", sample KL {r['delta_kl']}" for r in comp["records"]), "",
                  "| prompt | greedy continuation (24 tokens) |", "|---|---|"]
        lines += [f"| {g['prompt']} | {_cell(g['output'])} |" for g in comp["generations"]]
    mini = results.get("minilm")
    if mini and "error" not in mini:
        lines += ["", "### MiniLM-L6, low-rank", "",
                  "| variant | params (M) | size MB | cosine vs fp32 (mean / min) | nearest-neighbour agreement | pass record |",
                  "|---|---|---|---|---|---|"]
        for key, r in mini.items():
            if not isinstance(r, dict) or "error" in r:
                continue
            s = r["record"]["stats"]
            what = {"lowrank-25": "25% of all parameters, from the linear layers",
                    "lowrank-25-embeddings": "25% of all parameters, linear layers and embedding tables",
                    "lowrank-25-of-linear": "25% of the linear layers' parameters"}.get(key, key)
            lines.append(f"| {what} ({1 - r['parameters'] / mini['fp32_params']:.1%} fewer in all) | {r['parameters'] / 1e6:.1f} | {r['size_mb']} | "
                         f"{r['cosine_mean']} / {r['cosine_min']} | {r['nn_agreement']} | {s.get('layers_factored')} layers factored, "
                         f"ranks {s.get('rank_min')}–{s.get('rank_max')} |")
    lines.append(END)
    text = path.read_text() if path.is_file() else ""
    block = "\n".join(lines)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    print(block)


if __name__ == "__main__":
    raise SystemExit(main())

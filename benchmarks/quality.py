"""Quantization quality tables for benchmarks/RESULTS.md, in one command.

    python -m benchmarks.quality [--windows 10] [--only NAME ...] [--skip-encoder]

SmolLM2-135M: fp32 and every quantized configuration below are compiled by kiln (cached
under $KILN_CACHE/quality, keyed by the recipe text) and measured with the same harness
as `kiln eval`: perplexity on the Lee corpus (windows of 512 tokens), mean KL and top-1
agreement against the fp32 artifact on the same tokens, bits per weight as stored
(values + scales + zero points, over the quantized weights), artifact size, and greedy
agreement with fp32 on 5 prompts × 64 new tokens (tokens before the first divergence).

MiniLM-L6: fp32 and int8 kiln artifacts, and ONNX Runtime's own recipe on the same raw
export (transformers optimizer + quantize_dynamic): cosine of the pooled embeddings to
the fp32 artifact (mean, min), nearest-neighbour agreement on 200 Lee sentences, and
batch-1 seq-128 latency (median of 30, 2 threads, interleaved).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import kiln
from kiln.recipes import load_recipe
from benchmarks.parity import PROMPTS
from benchmarks.report import machine_line, write_section
from kiln.models.cache import cache_dir

PRESETS = ["fp32", "int8", "int8-dynamic", "int4", "int4-quality"]


def _q(**params) -> str:
    lines = ['base = "fp32"', "[[passes]]", 'name = "quantize-weights"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in {"budget": 1.0, **params}.items()]
    return "\n".join(lines + ["[[passes]]", 'name = "eliminate-dead-code"', ""])


# name -> preset name, or recipe text; the order is the table's.
CONFIGS: dict[str, str] = {
    "fp32": "fp32",
    "int8 (preset)": "int8",
    "int4 RTN b32, head+emb": _q(bits=4, block_size=32),
    "int4 RTN b32, head+emb fp32": _q(bits=4, block_size=32, include_lm_head=False, include_embedding=False),
    "int4 GPTQ b64, head+emb (int4 preset)": "int4",
    "int4 GPTQ b32, head+emb (int4-quality preset)": "int4-quality",
}


def compile_config(name: str, recipe: str, workdir: Path) -> Path:
    key = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    out = workdir / f"smollm2-{key}"
    if (out / "kiln.json").exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        path = recipe
        if recipe not in PRESETS:
            path = Path(tmp) / "recipe.toml"
            path.write_text(f'name = "{name}"\n' + recipe)
        t0 = time.perf_counter()
        kiln.compile("smollm2-135m", out, recipe=path, force=True, progress=False)
        print(f"  compiled {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _bits(manifest: dict) -> float:
    for record in manifest["passes"]:
        if record["name"] == "quantize-weights" and record["modified"]:
            return record["stats"]["bits_per_weight"]
    return 32.0


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def greedy_agreement(art, ref_tokens: dict[str, list[int]], new_tokens: int) -> tuple[float, int]:
    """Mean fraction of tokens before the first divergence from fp32, and prompts fully equal."""
    fractions, identical = [], 0
    for prompt in PROMPTS:
        got = art.generate(prompt, new_tokens).token_ids
        ref = ref_tokens[prompt]
        same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
        fractions.append(same / max(len(ref), 1))
        identical += got == ref
    return float(np.mean(fractions)), identical


def smollm2(args, workdir: Path) -> tuple[str, dict]:
    from kiln.evaluate import evaluate_lm

    names = [n for n in CONFIGS if not args.only or any(o in n for o in args.only) or n == "fp32"]
    paths = {n: compile_config(n, CONFIGS[n], workdir) for n in names}
    ref = kiln.load(paths["fp32"])
    ref_tokens = {p: ref.generate(p, args.new_tokens).token_ids for p in PROMPTS}
    fp32_size = _size(paths["fp32"])
    rows, raw = [], {}
    for name in names:
        art = kiln.load(paths[name])
        report = evaluate_lm(art, context=512, stride=512, max_windows=args.windows,
                             reference=None if name == "fp32" else ref)
        agreement, identical = greedy_agreement(art, ref_tokens, args.new_tokens)
        entry = {"bits_per_weight": _bits(art.manifest), "size_mb": round(_size(paths[name]) / 1e6, 1),
                 "size_ratio": round(_size(paths[name]) / fp32_size, 3), "ppl": round(report.perplexity, 2),
                 "ppl_increase": report.ppl_increase, "kl": report.kl, "top1": report.top1_agreement,
                 "greedy_prefix": round(agreement, 3), "greedy_identical": identical,
                 "recipe": CONFIGS[name], "artifact": str(paths[name])}
        raw[name] = entry
        print(f"  {name}: {json.dumps({k: v for k, v in entry.items() if k not in ('recipe', 'artifact')})}", flush=True)
        rows.append(
            f"| {name} | {entry['bits_per_weight']:.2f} | {entry['size_mb']} | {entry['size_ratio']:.3f}× | "
            f"{entry['ppl']:.2f} | {_pct(entry['ppl_increase'])} | {_num(entry['kl'])} | {_num(entry['top1'])} | "
            f"{entry['greedy_prefix']:.0%} ({identical}/{len(PROMPTS)}) |")
    text = "\n".join([
        "## Quantization quality: SmolLM2-135M-Instruct",
        "",
        f"Produced by `python -m benchmarks.quality --windows {args.windows}`. Perplexity on the Lee corpus "
        f"(gensim `lee_background.cor`), {args.windows} windows of 512 tokens; KL(fp32 ‖ config) and top-1 "
        "agreement of the next-token distributions on the same tokens; data-aware methods calibrate on "
        "`lee.cor` (50 other articles, disjoint). Greedy: share of the 64 new tokens before the first "
        f"divergence from fp32, over {len(PROMPTS)} prompts (fully identical prompts in brackets). "
        "Bits per weight count values, fp32 scales and zero points of the quantized weights; the size "
        "ratio is against the fp32 artifact. ORT runs int4/int8 as MatMulNBits with int8 activations "
        "(accuracy_level 4) and the embedding as GatherBlockQuantized sharing the LM head's bytes.",
        "",
        "| config | bits/weight | size MB | size ratio | PPL | ΔPPL | KL | top-1 | greedy = fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    return text, raw


def _pct(x):
    return "—" if x is None else f"{x:+.1%}"


def _num(x):
    return "—" if x is None else f"{x:.3f}"


def minilm(args, workdir: Path) -> tuple[str, dict]:
    import onnxruntime as ort

    from kiln.evaluate import sentences
    from kiln.corpus import default_corpus, read_text
    from kiln.models import get_source, prepare

    paths = {}
    for recipe in ("fp32", "int8-dynamic"):
        # keyed by the recipe's passes, so that a changed preset is recompiled
        key = hashlib.sha256(json.dumps(load_recipe(recipe).as_dict()["passes"]).encode()).hexdigest()[:10]
        paths[recipe] = workdir / f"minilm-{recipe}-{key}"
        if not (paths[recipe] / "kiln.json").exists():
            kiln.compile("minilm-l6", paths[recipe], recipe=recipe, force=True, progress=False)
    fp32 = kiln.load(paths["fp32"], threads=args.threads)
    int8 = kiln.load(paths["int8-dynamic"], threads=args.threads)
    ort_path = ort_recipe(prepare(get_source("minilm-l6"), progress=False).path, workdir / "minilm-ort-recipe")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    ort_session = ort.InferenceSession(str(ort_path), opts, providers=["CPUExecutionProvider"])

    def ort_embed(texts):
        return ort_session.run(["embedding"], fp32.tokenize_batch(texts))[0]

    systems = {"kiln fp32": fp32.embed, "kiln int8-dynamic": int8.embed, "ORT recipe (optimizer + quantize_dynamic)": ort_embed}
    sents = sentences(read_text(default_corpus()), 200)
    ref = np.concatenate([fp32.embed(sents[i:i + 32]) for i in range(0, len(sents), 32)])

    def neighbours(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    # batch 1, 128 real tokens: the first sentences joined, truncated to 128 tokens
    long_text = " ".join(sents[:20])
    feeds = fp32.tokenize_batch([long_text])
    feeds = {k: v[:, :128] for k, v in feeds.items()}
    sessions = {"kiln fp32": fp32.session, "kiln int8-dynamic": int8.session,
                "ORT recipe (optimizer + quantize_dynamic)": ort_session}
    times = {k: [] for k in sessions}
    for rep in range(31):
        for name, session in sessions.items():
            t0 = time.perf_counter()
            session.run(["embedding"], feeds)
            if rep:
                times[name].append(time.perf_counter() - t0)
    raw, rows = {}, []
    base = statistics.median(times["kiln fp32"])
    for name, embed in systems.items():
        emb = np.concatenate([embed(sents[i:i + 32]) for i in range(0, len(sents), 32)])
        cos = np.sum(emb * ref, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
        nn = float(np.mean(neighbours(emb) == neighbours(ref)))
        ms = statistics.median(times[name]) * 1000
        path = paths.get(name.split()[-1]) if name.startswith("kiln") else ort_path.parent
        raw[name] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "nn_agreement": nn,
                     "latency_ms": round(ms, 2), "size_mb": round(_size(path) / 1e6, 1)}
        rows.append(f"| {name} | {raw[name]['size_mb']} | {cos.mean():.5f} | {cos.min():.5f} | {nn:.1%} | "
                    f"{ms:.2f} | {ms / 1000 / base:.2f}× |")
        print(f"  {name}: {json.dumps(raw[name])}", flush=True)
    text = "\n".join([
        "## Quantization quality: all-MiniLM-L6-v2",
        "",
        f"Produced by `python -m benchmarks.quality`. Pooled, normalized embeddings of {len(sents)} Lee sentences "
        "against the kiln fp32 artifact; nearest neighbour = the most similar other sentence. Latency: batch 1, "
        f"128 tokens, {args.threads} threads, 30 interleaved runs after a warm-up, median; ratio to kiln fp32.",
        "",
        "| system | size MB | mean cosine | min cosine | nearest-neighbour agreement | latency ms | × kiln fp32 |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    return text, raw


def ort_recipe(source: Path, out: Path) -> Path:
    """ONNX Runtime's documented recipe: transformer optimizer (bert) + dynamic int8 quantization."""
    target = out / "model.onnx"
    if target.exists():
        return target
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    out.mkdir(parents=True, exist_ok=True)
    optimized = optimize_model(str(source), model_type="bert", num_heads=12, hidden_size=384)
    optimized.save_model_to_file(str(out / "optimized.onnx"))
    quantize_dynamic(str(out / "optimized.onnx"), str(target), weight_type=QuantType.QInt8)
    (out / "optimized.onnx").unlink()
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=10, help="Lee windows of 512 tokens for perplexity")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="only configs whose name contains one of these")
    parser.add_argument("--skip-encoder", action="store_true")
    parser.add_argument("--skip-llm", action="store_true")
    args = parser.parse_args(argv)
    workdir = cache_dir("quality")
    results_json = Path(__file__).resolve().parent / "quality.json"
    results = json.loads(results_json.read_text()) if results_json.exists() else {}
    if not args.skip_llm:
        text, results["smollm2"] = smollm2(args, workdir)
        write_section("quality-llm", text + "\n\n" + machine_line())
    if not args.skip_encoder:
        text, results["minilm"] = minilm(args, workdir)
        write_section("quality-encoder", text + "\n\n" + machine_line())
    results_json.write_text(json.dumps(results, indent=2) + "\n")
    print("wrote benchmarks/RESULTS.md and benchmarks/quality.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

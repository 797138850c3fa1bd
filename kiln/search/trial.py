"""One trial of a search, as it runs on a worker: compile, evaluate, benchmark; never raises.

    run_trial(spec) -> record
    spec:   {"number", "model", "recipe" (a .toml path), "workdir", "task", "allow_pickle",
             "cache" (KILN_CACHE or None), "threads", "corpus", "reference" (its record, None
             for the reference itself), "max_size_mb", "max_ppl_increase", "min_cosine"}
    record: {"number", "status": ok | pruned | failed, "reason", "size_mb", "quality", "speed",
             "feasible", "violations", "seconds", "node", "artifact"}

- The compile gets the search's quality budget, so a lossy pass that breaks it stops the trial
  there (status pruned, the pass's one line as the reason), before evaluation and benchmark.
- An artifact over the size budget is pruned before evaluation.
- Quality is `kiln eval`'s: LLMs, perplexity on the evaluation corpus (10 windows of 512
  tokens) against the reference's (the fp32 compile); encoders, mean cosine and
  nearest-neighbour agreement with the reference on 200 sentences.
- Speed is `kiln bench`'s medians at the trial's thread count: LLMs, decode tok/s (prompt 64,
  64 new tokens, 3 repeats); encoders, sequences/s at batch 32 x 128 tokens.
- A trial that breaks the quality budget on the evaluation text is not benchmarked.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

LM_EVAL = {"context": 512, "stride": 512, "windows": 10}
ENCODER_SENTENCES = 200
LM_BENCH = {"prompt_tokens": 64, "new_tokens": 64, "repeats": 3}
ENCODER_REPEATS = 3
SPEED_KEY = {"causal-lm": "decode_tok_s", "embedding": "throughput_b32_s128_seq_s"}


def artifact_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def run_trial(spec: dict) -> dict:
    if spec.get("cache"):
        os.environ["KILN_CACHE"] = spec["cache"]
    record = {"number": spec["number"], "status": "ok", "reason": None, "size_mb": None, "quality": {},
              "speed": {}, "feasible": False, "violations": [], "seconds": {}, "node": _node()}
    start = time.perf_counter()
    try:  # where and when each attempt ran (Ray runs a trial again when its node dies)
        (Path(spec["workdir"]) / f"started-{os.getpid()}.json").write_text(
            json.dumps({"node": record["node"], "time": time.time()}))
    except OSError:  # a worker that cannot see the search directory still runs the trial
        pass
    try:
        _run(spec, record)
    except Exception as exc:  # a trial never takes the search down: its failure is its record
        from kiln.errors import KilnError

        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        record.update(status="failed", reason=text if isinstance(exc, KilnError)
                      else f"internal error: {type(exc).__name__}: {text}")
        record["traceback"] = traceback.format_exc(limit=-8)
    record["seconds"]["total"] = round(time.perf_counter() - start, 1)
    return record


def _node() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # run outside Ray (tests, a local rerun)
        return None


def _run(spec: dict, record: dict) -> None:
    import kiln
    from kiln.evaluate import evaluate_encoder, evaluate_lm
    from kiln.passes.pipeline import BudgetExceeded

    out = Path(spec["workdir"]) / "artifact"
    reference = spec.get("reference")
    t = time.perf_counter()
    try:
        result = kiln.compile(spec["model"], out, recipe=spec["recipe"], task=spec.get("task"), force=True,
                              allow_pickle=spec.get("allow_pickle", False), progress=False,
                              max_ppl_increase=spec.get("max_ppl_increase") if reference else None,
                              min_cosine=spec.get("min_cosine") if reference else None)
    except BudgetExceeded as exc:
        record.update(status="pruned", reason=str(exc).splitlines()[0], violations=["quality"])
        return
    finally:
        record["seconds"]["compile"] = round(time.perf_counter() - t, 1)
    record["artifact"] = str(out)
    record["task"] = task = result.manifest["task"]
    record["size_mb"] = round(artifact_mb(out), 3)
    if reference is not None and spec.get("max_size_mb") is not None and record["size_mb"] > spec["max_size_mb"]:
        record.update(status="pruned", reason=f"size {record['size_mb']:.1f} MB over the budget of {spec['max_size_mb']:g} MB")
        record["violations"].append("size")
        return
    if task not in SPEED_KEY:
        raise kiln.KilnError(f"kiln search measures causal LMs (perplexity) and encoders (cosine), not a '{task}' model")

    from kiln.corpus import EVAL_CORPORA

    art = kiln.load(out, threads=spec.get("threads"))
    text = EVAL_CORPORA[spec.get("corpus") or "lee"]()
    t = time.perf_counter()
    if task == "causal-lm":
        report = evaluate_lm(art, text, LM_EVAL["context"], LM_EVAL["stride"], LM_EVAL["windows"])
        quality = {"perplexity": round(report.perplexity, 4)}
        if reference is not None:
            quality["ppl_increase"] = round(report.perplexity / reference["quality"]["perplexity"] - 1, 5)
        else:
            quality["ppl_increase"] = 0.0
    else:
        ref = kiln.load(Path(reference["artifact"]) if reference else out)
        report = evaluate_encoder(art, ref, text, ENCODER_SENTENCES)
        quality = {"cosine_mean": round(report.cosine_mean, 6), "cosine_min": round(report.cosine_min, 6),
                   "nearest_neighbour_agreement": round(report.nearest_neighbour_agreement, 4)}
    record["quality"] = quality
    record["seconds"]["eval"] = round(time.perf_counter() - t, 1)
    if reference is not None:
        if spec.get("max_ppl_increase") is not None and quality["ppl_increase"] > spec["max_ppl_increase"]:
            record["violations"].append("quality")
        if spec.get("min_cosine") is not None and quality["cosine_mean"] < spec["min_cosine"]:
            record["violations"].append("quality")
    if record["violations"]:
        record.update(status="pruned", reason=f"over the quality budget on the evaluation text: {quality}")
        return

    from kiln.bench import bench_encoder, bench_llm

    t = time.perf_counter()
    speed = bench_llm(art, **LM_BENCH) if task == "causal-lm" else bench_encoder(art, ENCODER_REPEATS)
    speed.pop("peak_rss_mb", None)
    record["speed"] = speed
    record["seconds"]["bench"] = round(time.perf_counter() - t, 1)
    record["feasible"] = True

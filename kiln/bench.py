"""`kiln bench DIR`: prefill and decode speed of one artifact, with medians over repeats.

Numbers on a shared 2-core machine are noisy: compare systems side by side in one run
(benchmarks/run.py), and read absolute values with care.
"""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np

from kiln.runtime import Artifact
from kiln.runtime.generate import Model

# Plain English, repeated as needed, so the prompt is the same for every system.
TEXT = ("The history of the region is long and varied. Farmers settled the river valleys, "
        "traders crossed the mountains, and towns grew where the roads met. Over the centuries "
        "the people built schools, markets and libraries, and wrote down what they learned. ")


def prompt_ids(art: Artifact, tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < tokens:
        ids += art.encode(TEXT)
    return ids[:tokens]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_llm(art: Artifact, prompt_tokens: int = 128, new_tokens: int = 128, repeats: int = 5) -> dict:
    model = Model(art.session, art.manifest)
    ids = prompt_ids(art, prompt_tokens)
    prefill, decode = [], []
    for rep in range(repeats + 1):  # the first run is a warm-up
        t0 = time.perf_counter()
        x = np.array([ids], dtype=np.int64)
        mask = np.ones_like(x)
        pos = np.arange(len(ids), dtype=np.int64)[None]
        logits, cache = model.forward(x, mask, pos, model.empty_cache(1) if model.kv else None)
        token = int(np.argmax(logits[0]))
        t1 = time.perf_counter()
        seq = list(ids) + [token]
        for step in range(new_tokens - 1):
            if model.kv:
                mask = np.ones((1, len(seq)), dtype=np.int64)
                logits, cache = model.forward(np.array([[token]], dtype=np.int64), mask,
                                              np.array([[len(seq) - 1]], dtype=np.int64), cache)
            else:
                logits, _ = model.forward(np.array([seq], dtype=np.int64), None, None, None)
            token = int(np.argmax(logits[0]))
            seq.append(token)
        t2 = time.perf_counter()
        if rep:
            prefill.append(t1 - t0)
            decode.append(t2 - t1)
    ttft = statistics.median(prefill)
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "ttft_s": round(ttft, 4),
        "prefill_tok_s": round(prompt_tokens / ttft, 1),
        "decode_tok_s": round((new_tokens - 1) / statistics.median(decode), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def bench_encoder(art: Artifact, repeats: int = 5) -> dict:
    def run(batch: int, seq: int) -> float:
        feeds = art.tokenize_batch(["hello world"])
        feeds = {k: np.resize(v[:, :1], (batch, seq)) if k != "attention_mask" else np.ones((batch, seq), dtype=np.int64)
                 for k, v in feeds.items()}
        times = []
        for rep in range(repeats + 1):
            t0 = time.perf_counter()
            art.session.run(None, feeds)
            if rep:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    result = {f"latency_b1_s{s}_ms": round(1000 * run(1, s), 2) for s in (16, 128)}
    result["throughput_b32_s128_seq_s"] = round(32 / run(32, 128), 1)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result

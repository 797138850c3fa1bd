"""`kiln bench DIR`: prefill and decode speed of one artifact, with medians over repeats.

The timing loop (`time_generation`, `time_encoder`) is shared with the side-by-side benchmark
(benchmarks/run.py), which drives kiln and its peers through the same `LMRunner` interface.
Numbers on a shared 2-core machine are noisy: compare systems side by side in one run, and
read absolute values with care.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import numpy as np

from kiln.runtime import Artifact
from kiln.runtime.generate import Model

# Plain English, repeated as needed, so the prompt is the same for every system.
TEXT = ("The history of the region is long and varied. Farmers settled the river valleys, "
        "traders crossed the mountains, and towns grew where the roads met. Over the centuries "
        "the people built schools, markets and libraries, and wrote down what they learned. ")


def text_ids(encode, tokens: int) -> list[int]:
    """`tokens` ids of TEXT, repeated as needed; `encode` maps text to ids."""
    ids: list[int] = []
    while len(ids) < tokens:
        ids += encode(TEXT)
    return ids[:tokens]


def prompt_ids(art: Artifact, tokens: int) -> list[int]:
    return text_ids(art.encode, tokens)


def peak_rss_mb() -> float:
    """This process's peak resident set (Linux: VmHWM, which starts afresh at exec, unlike ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LMRunner:
    """Greedy generation, split where the timer needs it. Every benchmarked system implements it."""

    name = ""
    size_bytes = 0

    def prefill(self, ids: list[int]) -> int:
        """Process the prompt from an empty cache; return the first generated token (greedy)."""
        raise NotImplementedError

    def decode(self, token: int, steps: int) -> list[int]:
        """Feed `token`, then greedy-decode: return `steps` new tokens."""
        raise NotImplementedError


class ArtifactLM(LMRunner):
    """A kiln causal-LM artifact: through its KV cache, or recomputing the sequence without one."""

    def __init__(self, art: Artifact, name: str = "kiln"):
        self.name = name
        self.model = Model(art.session, art.manifest)
        self.size_bytes = sum(f.stat().st_size for f in Path(art.path).iterdir() if f.is_file())

    def prefill(self, ids):
        x = np.array([ids], dtype=np.int64)
        self.seq = list(ids)
        if self.model.kv:
            logits, self.cache = self.model.forward(x, np.ones_like(x), np.arange(len(ids), dtype=np.int64)[None],
                                                    self.model.empty_cache(1))
        else:
            logits, self.cache = self.model.forward(x, None, None, None)
        return int(np.argmax(logits[0]))

    def decode(self, token, steps):
        out = []
        for _ in range(steps):
            self.seq.append(token)
            if self.model.kv:
                n = len(self.seq)
                logits, self.cache = self.model.forward(np.array([[token]], dtype=np.int64), np.ones((1, n), dtype=np.int64),
                                                        np.array([[n - 1]], dtype=np.int64), self.cache)
            else:
                logits, _ = self.model.forward(np.array([self.seq], dtype=np.int64), None, None, None)
            token = int(np.argmax(logits[0]))
            out.append(token)
        return out


def time_generation(runner: LMRunner, ids: list[int], steps: int) -> dict:
    """One timed generation: prefill `ids`, then `steps` decode steps (0: prefill only).

    Returns {"ttft_s": prefill + first token, "decode_s_per_token", "tokens": first + decoded}.
    """
    t0 = time.perf_counter()
    first = runner.prefill(ids)
    t1 = time.perf_counter()
    rest = runner.decode(first, steps) if steps else []
    t2 = time.perf_counter()
    return {"ttft_s": t1 - t0, "decode_s_per_token": (t2 - t1) / steps if steps else None, "tokens": [first, *rest]}


def bench_llm(art: Artifact, prompt_tokens: int = 128, new_tokens: int = 128, repeats: int = 5) -> dict:
    runner = ArtifactLM(art)
    ids = prompt_ids(art, prompt_tokens)
    prefill, decode = [], []
    for rep in range(repeats + 1):  # the first run is a warm-up
        r = time_generation(runner, ids, new_tokens - 1)
        if rep:
            prefill.append(r["ttft_s"])
            decode.append(r["decode_s_per_token"])
    ttft = statistics.median(prefill)
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "ttft_s": round(ttft, 4),
        "prefill_tok_s": round(prompt_tokens / ttft, 1),
        "decode_tok_s": round(1 / statistics.median(decode), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


# --- encoders ----------------------------------------------------------------------------

def encoder_ids(batch: int, seq: int, vocab_size: int = 30522) -> np.ndarray:
    """Identical token ids for every encoder system: [CLS] w ... w [SEP] (BERT's ids), words from a fixed seed."""
    lo = min(1000, vocab_size // 4)
    ids = np.random.default_rng(0).integers(lo, min(lo + 1000, vocab_size), size=(batch, seq), dtype=np.int64)
    if vocab_size > 1000:
        ids[:, 0], ids[:, -1] = 101, 102
    return ids


def encoder_feeds(input_names: list[str], ids: np.ndarray) -> dict[str, np.ndarray]:
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {k: v for k, v in feeds.items() if k in input_names}


def time_encoder(run, ids: np.ndarray) -> float:
    """Seconds for one forward pass: `run(ids)`."""
    t0 = time.perf_counter()
    run(ids)
    return time.perf_counter() - t0


ENCODER_SHAPES = {"latency_b1_s16_ms": (1, 16), "latency_b1_s128_ms": (1, 128), "throughput_b32_s128_seq_s": (32, 128)}


def bench_encoder(art: Artifact, repeats: int = 5) -> dict:
    def run(ids):
        art.session.run(None, encoder_feeds(art.input_names, ids))

    result = {}
    vocab = art.manifest.get("source", {}).get("vocab_size") or 30522
    for key, (batch, seq) in ENCODER_SHAPES.items():
        ids = encoder_ids(batch, seq, vocab)
        times = [time_encoder(run, ids) for _ in range(repeats + 1)][1:]  # the first is a warm-up
        median = statistics.median(times)
        result[key] = round(1000 * median, 2) if key.startswith("latency") else round(batch / median, 1)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result

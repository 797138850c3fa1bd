"""Helpers shared by passes that produce or rewrite a KV-cache graph: feeds in the cache
layout the graph records (`kiln.ir.kv_layout`, cache names from its templates), the
decode-consistency check (batch 2, optionally a left-padded row and a prefill past every
sliding window), and ORT sessions that log nothing (a failed check reaches the user as the
pass's own one-line error)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.ir import kv_layout
from kiln.manifest import KVLayout
from kiln.passes.numerics import compare


def cache_feeds(layout: KVLayout, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for a prefill of `input_ids` with an empty past and no padding."""
    batch, seq = input_ids.shape
    dtype = np.float16 if layout.dtype == "float16" else np.float32
    length = (layout.max_length or 0) if layout.static else 0
    feeds = {
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "position_ids": np.tile(np.arange(seq, dtype=np.int64), (batch, 1)),
    }
    if layout.static:
        feeds["attention_mask"] = np.zeros((batch, length), dtype=np.int64)
        feeds["attention_mask"][:, :seq] = 1
        feeds["cache_position"] = np.arange(seq, dtype=np.int64)
    for key, value in layout.past_names:
        feeds[key] = np.zeros((batch, layout.kv_heads, length, layout.head_dim), dtype=dtype)
        feeds[value] = np.zeros((batch, layout.kv_heads, length, layout.value_head_dim), dtype=dtype)
    return feeds


def step_feeds(layout: KVLayout, tokens: np.ndarray, t: int, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds for one decode step: `tokens` [B, 1] at position t, the past from `out`'s presents."""
    batch = len(tokens)
    feeds = {"input_ids": tokens.astype(np.int64), "attention_mask": np.ones((batch, t + 1), dtype=np.int64),
             "position_ids": np.full((batch, 1), t, dtype=np.int64)}
    if layout.static:
        feeds["attention_mask"] = np.zeros((batch, layout.max_length), dtype=np.int64)
        feeds["attention_mask"][:, : t + 1] = 1
        feeds["cache_position"] = np.array([t], dtype=np.int64)
    for past, present in layout.cache_pairs().items():
        feeds[past] = out[present]
    return feeds


def quiet_session(model: ir.Model):
    """A CPU session that logs nothing: a failure reaches the user as the caller's one line."""
    import onnxruntime as ort

    from kiln.passes.numerics import ort_session

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort_session(model, opts)


def run_quiet(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = quiet_session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def decode_consistency(model: ir.Model, prefill: int = 5, steps: int = 3, capacity: int = 0, pad: int = 0) -> float:
    """max_rel between one full prefill and prefill + `steps` single-token decodes through the cache,
    at batch 2.

    With `pad` > 0 row 1 is row 0's first tokens left-padded by `pad` slots (attention_mask 0,
    position_ids counting real tokens only): its logits must also equal row 0's at the same
    positions, so padding and slots are checked as well as the cache. Make `prefill` longer
    than any sliding window so that the window is crossed both in the prefill and in decoding.

    With `capacity` > 0 the past is a preallocated buffer of that many slots, as a runtime
    that shares one buffer between past and present passes it: the used slots first, random
    values in the free ones (which must not leak into the result), and each step's present
    (the whole buffer) fed back as the next past."""
    layout = kv_layout(model)
    if layout.static:
        pad = 0  # the static variant's slots are given by cache_position; checked without padding
    rng = np.random.default_rng(2)
    vocab = model.graph.outputs[0].shape[-1] if model.graph.outputs[0].shape is not None else 2
    vocab = vocab if isinstance(vocab, int) else 2
    n = prefill + steps
    ids = np.random.default_rng(1).integers(0, vocab, size=(2, n))
    if pad:
        ids[1] = np.concatenate([np.zeros(pad, dtype=ids.dtype), ids[0, : n - pad]])
    mask = np.ones((2, n), dtype=np.int64)
    mask[1, :pad] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    name = model.graph.outputs[0].name
    session = quiet_session(model)

    def run(feeds):
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))

    def feeds_for(lo: int, hi: int, out: dict | None) -> dict:
        if out is None:
            feeds = cache_feeds(layout, ids[:, :hi])
            if capacity:
                for k in layout.cache_pairs():
                    shape = feeds[k].shape[:2] + (capacity,) + feeds[k].shape[3:]
                    feeds[k] = rng.standard_normal(shape).astype(feeds[k].dtype)
        else:
            feeds = step_feeds(layout, ids[:, lo:hi], lo, out)
        if not layout.static:
            feeds["attention_mask"] = mask[:, :hi]
            feeds["position_ids"] = positions[:, lo:hi]
        return feeds

    full = run(feeds_for(0, n, None))[name]
    out = run(feeds_for(0, prefill, None))
    pieces = [out[name]]
    for t in range(prefill, n):
        out = run(feeds_for(t, t + 1, out))
        pieces.append(out[name])
    cached = np.concatenate(pieces, axis=1)
    real = np.ones((2, n), dtype=bool)
    real[1, :pad] = False  # padded slots' outputs are not defined
    worst = compare({name: full[real]}, {name: cached[real]})["max_rel"]
    if pad:
        worst = max(worst, compare({name: full[0, : n - pad]}, {name: full[1, pad:]})["max_rel"])
    return worst

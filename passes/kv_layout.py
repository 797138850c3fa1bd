"""Helpers shared by passes that produce or rewrite a KV-cache graph: feeds in the cache
layout recorded under `kiln.kv_cache`, and the decode-consistency check."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from kiln.ir import KV_CACHE_METADATA
from kiln.passes.numerics import compare, run_ort


def cache_feeds(layout: dict, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for a prefill of `input_ids` with an empty past and no padding."""
    batch, seq = input_ids.shape
    dtype = np.float16 if layout["dtype"] == "float16" else np.float32
    length = layout.get("max_length", 0) if layout.get("static") else 0
    feeds = {
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "position_ids": np.tile(np.arange(seq, dtype=np.int64), (batch, 1)),
    }
    if layout.get("static"):
        feeds["attention_mask"] = np.zeros((batch, length), dtype=np.int64)
        feeds["attention_mask"][:, :seq] = 1
        feeds["cache_position"] = np.arange(seq, dtype=np.int64)
    for i in range(layout["num_layers"]):
        feeds[f"past_key_values.{i}.key"] = np.zeros((batch, layout["kv_heads"], length, layout["head_dim"]), dtype=dtype)
        feeds[f"past_key_values.{i}.value"] = np.zeros((batch, layout["kv_heads"], length, layout["value_head_dim"]), dtype=dtype)
    return feeds


def step_feeds(layout: dict, tokens: np.ndarray, t: int, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds for one decode step: `tokens` [B, 1] at position t, the past from `out`'s presents."""
    batch = len(tokens)
    feeds = {"input_ids": tokens.astype(np.int64), "attention_mask": np.ones((batch, t + 1), dtype=np.int64),
             "position_ids": np.full((batch, 1), t, dtype=np.int64)}
    if layout.get("static"):
        feeds["attention_mask"] = np.zeros((batch, layout["max_length"]), dtype=np.int64)
        feeds["attention_mask"][:, : t + 1] = 1
        feeds["cache_position"] = np.array([t], dtype=np.int64)
    for i in range(layout["num_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = out[f"present.{i}.{kind}"]
    return feeds


def decode_consistency(model: ir.Model, prefill: int = 5, steps: int = 3, capacity: int = 0) -> float:
    """max_rel between one full prefill and prefill + `steps` single-token decodes through the cache.

    With `capacity` > 0 the past is a preallocated buffer of that many slots, as a runtime
    that shares one buffer between past and present passes it: the used slots first, random
    values in the free ones (which must not leak into the result), and each step's present
    (the whole buffer) fed back as the next past."""
    layout = json.loads(model.metadata_props[KV_CACHE_METADATA])
    rng = np.random.default_rng(2)
    vocab = model.graph.outputs[0].shape[-1] if model.graph.outputs[0].shape is not None else 2
    vocab = vocab if isinstance(vocab, int) else 2
    ids = np.random.default_rng(1).integers(0, vocab, size=(2, prefill + steps))
    name = model.graph.outputs[0].name
    full = run_ort(model, cache_feeds(layout, ids))
    feeds = cache_feeds(layout, ids[:, :prefill])
    if capacity:
        for k in [k for k in feeds if k.startswith("past_key_values.")]:
            shape = feeds[k].shape[:2] + (capacity,) + feeds[k].shape[3:]
            feeds[k] = rng.standard_normal(shape).astype(feeds[k].dtype)
    out = run_ort(model, feeds)
    pieces = [out[name]]
    for step in range(steps):
        t = prefill + step
        out = run_ort(model, step_feeds(layout, ids[:, t:t + 1], t, out))
        pieces.append(out[name])
    return compare({name: full[name]}, {name: np.concatenate(pieces, axis=1)})["max_rel"]

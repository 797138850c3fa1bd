"""Static-shape graphs served at any batch and sequence length, written once for every session
that needs it (ORT `PaddedSession`, `TvmSession`, the runtime's chunked static cache).

Three moves, each exact:
- rows (`run_rows`): a batch-1 graph runs a batch row by row (rows are independent) and the
  outputs are stacked on their batch axis;
- padding (`run_padded`): a fixed-length graph without a cache takes shorter inputs padded at
  the end of their sequence axis (padding is masked, or comes after the real tokens of a causal
  model), and its outputs with a sequence axis are cut back;
- chunks (`chunk_spans`, `pad_chunk`): a graph over a static KV cache that takes `chunk` tokens
  per call gets the tokens in chunks; a partial last chunk is padded by repeating its last
  token and position, its padding written to the free slots after the real tokens (masked
  out, overwritten later), and only the real positions' outputs are kept.

Values may be numpy arrays or session values (ORT values, TVM tensors) with `.numpy()`.
numpy only: nothing of the compiler.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kiln.errors import KilnError


def host(value) -> np.ndarray:
    """numpy from numpy, an ORT value or a TVM tensor."""
    return value if isinstance(value, np.ndarray) else value.numpy()


def shape(value) -> tuple[int, ...]:
    s = value.shape
    return tuple(s() if callable(s) else s)  # an OrtValue's shape is a method


def pad_axis(array: np.ndarray, axis: int, length: int, mode: str = "constant") -> np.ndarray:
    """`array` padded at the end of `axis` to `length` (zeros, or `mode="edge"`: the last entry repeated)."""
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, length - array.shape[axis])
    return np.pad(array, widths, mode=mode)


def take(value, axis: int, index: int | range | list) -> np.ndarray:
    return np.take(host(value), [index] if isinstance(index, int) else index, axis=axis)


def run_rows(run_one: Callable[[dict], dict], feeds: dict, batch_axes: dict[str, int]) -> dict:
    """{output: numpy} of a batch, through `run_one` (feeds of one row -> {output: value}) row by row.
    `batch_axes` names the batch axis of each input and output that has one; other feeds go to every row."""
    some = next((n for n in batch_axes if n in feeds), None)
    rows = 1 if some is None else shape(feeds[some])[batch_axes[some]]
    if rows == 1:
        return run_one(feeds)
    parts = [run_one({k: take(v, batch_axes[k], i) if k in batch_axes else v for k, v in feeds.items()})
             for i in range(rows)]
    return {k: np.concatenate([host(p[k]) for p in parts], axis=batch_axes[k]) if k in batch_axes else parts[-1][k]
            for k in parts[0]}


def run_padded(run_fixed: Callable[[dict], dict], feeds: dict, sequence_axes: dict[str, int], length: int) -> dict:
    """Outputs of a graph fixed at `length` tokens for feeds of up to `length` tokens: inputs with a
    sequence axis padded at the end with zeros, outputs with one cut back to the real length."""
    seq = sequence_length(feeds, sequence_axes)
    if seq is None:
        return run_fixed(feeds)
    if seq > length:
        raise KilnError(f"this artifact takes at most {length} tokens (static shapes), got {seq}")
    padded = {k: pad_axis(host(v), sequence_axes[k], length) if k in sequence_axes else v for k, v in feeds.items()}
    out = run_fixed(padded)
    return {k: take(v, sequence_axes[k], range(seq)) if k in sequence_axes and seq < length else v
            for k, v in out.items()}


def sequence_length(feeds: dict, sequence_axes: dict[str, int]) -> int | None:
    name = next((n for n in sequence_axes if n in feeds), None)
    return None if name is None else shape(feeds[name])[sequence_axes[name]]


def chunk_spans(seq: int, chunk: int) -> list[tuple[int, int]]:
    """(first token, real tokens) of each call that feeds `seq` tokens `chunk` at a time."""
    return [(begin, min(chunk, seq - begin)) for begin in range(0, seq, chunk)]


def check_chunk_room(cached: int, seq: int, chunk: int, slots: int) -> None:
    """Chunks write whole chunks of slots (padding included): refuse what does not fit the cache."""
    if cached + -(-seq // chunk) * chunk > slots:
        raise KilnError(f"{cached} cached + {seq} new tokens in chunks of {chunk} exceed the static cache "
                        f"length {slots}")


def pad_chunk(step: dict, sequence_axes: dict[str, int], chunk: int, end: int) -> dict:
    """A partial chunk padded to `chunk` tokens: every input with a sequence axis repeats its last
    entry (token, position), except `cache_position`, which continues with the free slots after
    the real ones (`end`, `end + 1`, ...), where the mask hides the padding until later tokens
    overwrite it. The caller keeps only the real positions' outputs."""
    out = {}
    for k, v in step.items():
        if k not in sequence_axes:
            out[k] = v
            continue
        a = host(v)
        out[k] = (np.concatenate([a, np.arange(end, end + chunk - a.shape[0], dtype=a.dtype)]) if k == "cache_position"
                  else pad_axis(a, sequence_axes[k], chunk, mode="edge"))
    return out

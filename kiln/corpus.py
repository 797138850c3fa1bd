"""Text for evaluation and calibration, from the `gensim` wheel (fetched with `pip download`).

The two sets are disjoint, so a data-aware pass never sees the text it is judged on:
- evaluation: `lee_background.cor`, 300 news articles;
- calibration: `lee.cor`, 50 other articles from the same source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.errors import KilnError
from kiln.models.fetch import fetch_wheel

GENSIM_WHEEL = "gensim==4.4.0"
EVAL_TEXT = "gensim/test/test_data/lee_background.cor"
CALIBRATION_TEXT = "gensim/test/test_data/lee.cor"


def default_corpus() -> Path:
    return fetch_wheel(GENSIM_WHEEL) / EVAL_TEXT


def calibration_corpus() -> Path:
    return fetch_wheel(GENSIM_WHEEL) / CALIBRATION_TEXT


def read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"{path}: no such text file")
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if not text:
        raise KilnError(f"{path}: the text is empty")
    return text


def text_feeds(tokenizer: Path, signature: list[dict], text: Path | None = None, samples: int = 16,
                      length: int = 256) -> list[dict[str, np.ndarray]]:
    """`samples` feed dicts of one window of `length` tokens each, consecutive in the text.

    Each window carries the special tokens the tokenizer adds to a text (BERT's [CLS] ... [SEP],
    a BOS), as the model sees them at run time. Masks are ones (no padding), other integer
    inputs zeros; a text shorter than samples × length gives fewer windows (at least one).
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    # tokenizer.json files may truncate (MiniLM: 128 tokens) or pad: the whole text is wanted here
    tok.no_truncation()
    tok.no_padding()
    prefix, suffix = _special_tokens(tok)
    ids = tok.encode(read_text(text or calibration_corpus()), add_special_tokens=False).ids
    if len(ids) < 8:
        raise KilnError(f"{text}: the text is too short (fewer than 8 tokens)")
    body = min(length - len(prefix) - len(suffix), len(ids))
    feeds = []
    for start in range(0, len(ids) - body + 1, body)[:samples]:
        window = np.array(prefix + ids[start:start + body] + suffix, dtype=np.int64)[None]
        feed = {}
        for spec in signature:
            name, dtype = spec["name"], spec["dtype"]
            if name == "input_ids":
                feed[name] = window.astype(dtype)
            elif dtype in ("int64", "int32"):
                feed[name] = (np.ones_like(window) if "mask" in name else np.zeros_like(window)).astype(dtype)
            else:
                raise KilnError(f"cannot make a calibration feed for input '{name}' ({dtype})")
        feeds.append(feed)
    return feeds


def _special_tokens(tok) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a single text."""
    core = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a").ids
    for i in range(len(full) - len(core) + 1):
        if full[i:i + len(core)] == core:
            return full[:i], full[i + len(core):]
    return [], []

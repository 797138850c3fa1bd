"""PyTorch references for a compiled artifact: what the source model itself answers.

Used by `kiln run --check`, the demo and the tests to show that an artifact keeps the
source's behaviour. It loads the source model named in the manifest (the runtime
itself never does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.models import SOURCES


def _source(manifest: dict, path: Path | None = None):
    """The source model: a named kiln model, or the folder or file it was compiled from (`path`:
    the manifest records only its name and sha256, not where it lived on the compiling machine)."""
    source = manifest.get("source", {})
    name, recorded = source.get("source"), source.get("path")
    if path is None and recorded:
        raise KilnError(f"no PyTorch reference: this artifact was compiled from '{recorded}' by path; "
                        f"give its location with --source PATH")
    if path is not None:
        from kiln.models.local import path_source

        if not Path(path).exists():
            raise KilnError(f"no PyTorch reference: {path} does not exist")
        found = path_source(Path(path), task=manifest.get("task"))
        if source.get("sha256") and found.fingerprint() != source["sha256"]:
            raise KilnError(f"{path} is not the model this artifact was compiled from (its sha256 differs)")
        return found.load()
    if name not in SOURCES:
        raise KilnError(f"no PyTorch reference for source '{name}' (only named kiln models and models "
                        "compiled by path have one)")
    return SOURCES[name].load()


def reference_generate(manifest: dict, prompt_ids: list[int], max_new_tokens: int, loaded=None,
                       source: Path | None = None) -> list[int]:
    """Greedy tokens from transformers `generate(do_sample=False)` (new tokens only)."""
    model = (loaded or _source(manifest, source)).reference
    gen = manifest.get("generation", {})
    eos = gen.get("eos_token_ids") or None
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.int64),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
            pad_token_id=gen.get("pad_token_id"),
        )
    return out[0, len(prompt_ids):].tolist()


def reference_embed(manifest: dict, feeds: dict[str, np.ndarray], loaded=None,
                    source: Path | None = None) -> np.ndarray:
    """Embeddings from the source model (with kiln's pooling wrapper) for the same token ids."""
    module = (loaded or _source(manifest, source)).module
    with torch.no_grad():
        return module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

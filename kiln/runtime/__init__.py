"""Run a kiln artifact from its manifest alone (never the source model).

    art = kiln.load("out/")
    art.generate("The capital of France is", max_new_tokens=16).text   # causal-lm
    art.embed(["hello world"])                                          # embedding

Generation here recomputes the full sequence at every step (greedy); the KV-cache
runtime replaces this once artifacts carry a cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from kiln.backends.ort import create_session
from kiln.errors import KilnError
from kiln.manifest import read_manifest


class ArtifactError(KilnError):
    pass


@dataclasses.dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]  # new tokens only
    text: str  # decoded new tokens
    stop_reason: str  # "eos" | "length"


class Artifact:
    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.task = self.manifest["task"]
        try:
            self.session = create_session(self.path, self.manifest["backend"], threads=threads)
        except Exception as exc:
            raise ArtifactError(f"{self.path}: cannot open the model: {str(exc).strip().splitlines()[0]}") from exc
        tok = self.manifest.get("tokenizer")
        self.tokenizer = Tokenizer.from_file(str(self.path / tok)) if tok else None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ArtifactError(f"{self.path}: the artifact has no tokenizer; pass token ids instead")
        return self.tokenizer

    # --- causal LM ----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._need_tokenizer().encode(text).ids

    def stream(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
        """Greedy decoding, one token at a time, stopping at an end-of-sequence token."""
        if self.task != "causal-lm":
            raise ArtifactError(f"{self.path}: a {self.task} artifact does not generate text")
        if not prompt_ids:
            raise ArtifactError("the prompt is empty")
        eos = set(self.manifest.get("generation", {}).get("eos_token_ids", []))
        ids = list(prompt_ids)
        for _ in range(max_new_tokens):
            (logits,) = self.session.run(["logits"], {"input_ids": np.array([ids], dtype=np.int64)})
            token = int(np.argmax(logits[0, -1]))
            ids.append(token)
            yield token
            if token in eos:
                return

    def generate(self, prompt: str | list[int], max_new_tokens: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        limit = max_new_tokens if max_new_tokens is not None else self.manifest.get("generation", {}).get("max_new_tokens", 64)
        eos = set(self.manifest.get("generation", {}).get("eos_token_ids", []))
        new: list[int] = []
        for token in self.stream(prompt_ids, limit):
            new.append(token)
            if on_token:
                on_token(token)
        text = self.tokenizer.decode(new, skip_special_tokens=True) if self.tokenizer else ""
        reason = "eos" if new and new[-1] in eos else "length"
        return Generation(prompt_ids, new, text, reason)

    # --- embeddings ---------------------------------------------------------------
    def embed(self, texts: list[str]) -> np.ndarray:
        if self.task != "embedding":
            raise ArtifactError(f"{self.path}: a {self.task} artifact does not produce embeddings")
        (embedding,) = self.session.run(["embedding"], self.tokenize_batch(texts))
        return embedding

    def tokenize_batch(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Encoder feeds for `texts`, padded to the longest and truncated to the model's limit."""
        tok = self._need_tokenizer()
        if not texts:
            raise ArtifactError("no text to embed")
        max_len = self.manifest.get("embedding", {}).get("max_sequence_length") or 512
        # Truncation in the tokenizer keeps the special tokens ([CLS] ... [SEP]) intact.
        tok.enable_truncation(max_len)
        tok.no_padding()  # some tokenizer.json files pad to a fixed length; pad to the batch instead
        encodings = tok.encode_batch(texts)
        length = max(len(e.ids) for e in encodings)
        feeds = {name: np.zeros((len(texts), length), dtype=np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            feeds["input_ids"][row, :n] = enc.ids
            feeds["attention_mask"][row, :n] = 1
            feeds["token_type_ids"][row, :n] = enc.type_ids
        return {k: v for k, v in feeds.items() if k in self.input_names}


def load(path: str | Path, threads: int | None = None) -> Artifact:
    return Artifact(path, threads=threads)

"""Run a kiln artifact from its manifest alone (never the source model).

    art = kiln.load("out/")
    art.generate("The capital of France is", max_new_tokens=16).text   # causal-lm
    art.embed(["hello world"])                                          # embedding

Artifacts with a KV cache (manifest `kv_cache`) decode one token per step through it;
others recompute the full sequence per token. See kiln.runtime.generate for batching.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from kiln.backends import create_session
from kiln.errors import KilnError
from kiln.manifest import read_manifest
from kiln.runtime.generate import (
    Generator,
    Model,
    SamplingParams,
    beam_search,
    generate_batch,
    generate_stream,
    run_requests,
)


class ArtifactError(KilnError):
    pass


@dataclasses.dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]  # new tokens only
    text: str  # decoded new tokens
    stop_reason: str  # "stop" (a stop / end-of-sequence token) | "length"


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
        self._model: Model | None = None

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ArtifactError(f"{self.path}: the artifact has no tokenizer; pass token ids instead")
        return self.tokenizer

    # --- causal LM ----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._need_tokenizer().encode(text).ids

    def chat_prompt(self, user_message: str) -> str:
        """The prompt text for one user turn, rendered with the model's chat template."""
        template = self.manifest.get("generation", {}).get("chat_template")
        if not template:
            raise ArtifactError(f"{self.path}: the model has no chat template")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(messages=[{"role": "user", "content": user_message}],
                                                add_generation_prompt=True)

    def _lm(self) -> Model:
        if self.task != "causal-lm":
            raise ArtifactError(f"{self.path}: a {self.task} artifact does not generate text")
        if self._model is None:
            self._model = Model(self.session, self.manifest)
        return self._model

    def _params(self, max_new_tokens: int | None, **sampling) -> SamplingParams:
        limit = max_new_tokens if max_new_tokens is not None else self.manifest.get("generation", {}).get("max_new_tokens", 64)
        return SamplingParams(max_new_tokens=limit, **sampling)

    def _ids(self, prompt: str | list[int]) -> list[int]:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ArtifactError("the prompt is empty")
        return ids

    def generate(self, prompt: str | list[int], max_new_tokens: int | None = None,
                 on_token: Callable[[int], None] | None = None, **sampling) -> Generation:
        """Continue one prompt (greedy unless temperature > 0), streaming tokens to `on_token`."""
        model, prompt_ids = self._lm(), self._ids(prompt)
        params = self._params(max_new_tokens, **sampling)
        new: list[int] = []
        for token in generate_stream(model, prompt_ids, params):
            new.append(token)
            if on_token:
                on_token(token)
        return self._result(prompt_ids, new, params)

    def generate_batch(self, prompts: list[str | list[int]], max_new_tokens: int | None = None,
                       **sampling) -> list[Generation]:
        """Static batching: all prompts padded into one batch."""
        ids = [self._ids(p) for p in prompts]
        params = self._params(max_new_tokens, **sampling)
        outs = generate_batch(self._lm(), ids, params)
        return [self._result(p, o, params) for p, o in zip(ids, outs)]

    def generate_continuous(self, prompts: list[str | list[int]], max_new_tokens: int | None = None,
                            arrivals: list[int] | None = None, **sampling) -> list[Generation]:
        """Continuous batching: request i joins at decode step arrivals[i]."""
        ids = [self._ids(p) for p in prompts]
        params = self._params(max_new_tokens, **sampling)
        outs = run_requests(self._lm(), [(p, params) for p in ids], arrivals)
        return [self._result(p, o, params) for p, o in zip(ids, outs)]

    def beam_search(self, prompt: str | list[int], num_beams: int = 4, max_new_tokens: int | None = None,
                    length_penalty: float = 1.0) -> Generation:
        params = self._params(max_new_tokens)
        prompt_ids = self._ids(prompt)
        tokens = beam_search(self._lm(), prompt_ids, num_beams, params.max_new_tokens, length_penalty)
        return self._result(prompt_ids, tokens, params)

    def generator(self) -> Generator:
        """A continuous-batching generator over this artifact: submit(ids, SamplingParams), step(), cancel()."""
        return Generator(self._lm())

    def _result(self, prompt_ids: list[int], new: list[int], params: SamplingParams) -> Generation:
        stops = set(params.stop_token_ids if params.stop_token_ids is not None else self._lm().eos)
        text = self.tokenizer.decode(new, skip_special_tokens=True) if self.tokenizer else ""
        return Generation(prompt_ids, new, text, "stop" if new and new[-1] in stops else "length")

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

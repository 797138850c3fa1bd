"""Run a kiln artifact from its manifest alone (never the source model).

    art = kiln.load("out/")
    art.generate("The capital of France is", max_new_tokens=16).text   # causal-lm
    art.embed(["hello world"])                                          # embedding
    art.classify(["query"], pairs=["passage"])[0].scores                # sequence-classification

The runtime imports numpy, onnxruntime, tokenizers and jsonschema (jinja2 for chat templates;
TVM's runtime for a TVM artifact), never the compiler: it installs alone (`pip install kiln`,
docs/runtime.md) and reads everything it needs from the manifest (docs/manifest.md).

Artifacts with a KV cache (manifest `kv_cache`) decode one token per step through it;
others recompute the full sequence per token. See kiln.runtime.generate for batching and
kiln.runtime.speculative for speculative decoding (`generate(..., speculative="lookup")`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from kiln.backends import create_session
from kiln.errors import KilnError
from kiln.manifest import (
    Classification,
    artifact_path,
    check_paths,
    read_manifest,
    verify_files,
)
from kiln.runtime.generate import (
    Generator,
    Model,
    SamplingParams,
    beam_search,
    generate_batch,
    generate_stream,
    graph_failures,
    run_requests,
)
from kiln.runtime.speculative import (
    Speculation,
    SpeculationError,
    SpeculativeGenerator,
    check_exact,
    check_model,
)


class ArtifactError(KilnError):
    pass


@dataclasses.dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]  # new tokens only
    text: str  # decoded new tokens
    stop_reason: str  # "stop" (a stop / end-of-sequence token) | "length" (max_new_tokens or the model's positions)
    speculation: dict | None = None  # with `speculative`: kiln.runtime.speculative.Stats.as_dict()


@dataclasses.dataclass
class Scores:
    """One row of `Artifact.classify`: the graph's raw logits and their scores, by label."""

    labels: list[str]
    logits: np.ndarray  # [num_labels] float32, as the graph returns them
    scores: np.ndarray  # softmax (single-label), sigmoid (multi-label) or the logits (regression)
    problem_type: str

    @property
    def label(self) -> str:
        """The highest-scoring label."""
        return self.labels[int(np.argmax(self.scores))]

    def as_dict(self) -> dict:
        return {"label": self.label, "problem_type": self.problem_type,
                "scores": {k: float(v) for k, v in zip(self.labels, self.scores)},
                "logits": [float(v) for v in self.logits]}


class Artifact:
    def __init__(self, path: str | Path, threads: int | None = None, verify: bool = False,
                 lora: dict[str, str | Path] | None = None):
        """Open the artifact at `path`. Every file its manifest names must be inside the directory,
        and the files its manifest records (`files`) must have their recorded sizes; with `verify`,
        their sha256 too (an artifact without `files` is then refused: it cannot be verified).
        `lora`: name -> PEFT adapter folder, loaded into the slots of an artifact compiled with
        `--lora-slots` (slot 1, 2, ... in order; docs/lora.md); generate with `adapter=name`."""
        self.path = Path(path)
        self.threads = threads  # a draft artifact (`speculation`) opens with the same
        self.manifest = read_manifest(self.path)
        self.task = self.manifest["task"]
        check_paths(self.path, self.manifest)
        verify_files(self.path, self.manifest, hashes=verify)
        self.adapters, initializers = self._adapters(lora or {})
        try:
            self.session = create_session(self.path, self.manifest["backend"], threads=threads,
                                          files=self.manifest.get("files"),
                                          **({"initializers": initializers} if initializers else {}))
        except KilnError:
            raise
        except Exception as exc:
            raise ArtifactError(f"{self.path}: cannot open the model: {_first_line(exc)}") from exc
        tok = self.manifest.get("tokenizer")
        self.tokenizer = self._load_tokenizer(tok) if tok else None
        # The tokenizer's own pad id (tokenizer.json `padding`), before padding is switched off.
        padding = self.tokenizer.padding if self.tokenizer is not None else None
        self.pad_id = int(padding["pad_id"]) if padding else 0
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._model: Model | None = None
        if self.task == "causal-lm":
            self._lm()  # the KV layout checked against the graph now, not mid-generation

    def _adapters(self, lora: dict) -> tuple[dict[str, int], dict]:
        """(adapter name -> slot, the slot tensors to replace the artifact's empty ones)."""
        record = self.manifest.get("lora") or {}
        if record.get("mode") != "slots":
            if lora:
                merged = [a.get("name") for a in record.get("adapters", [])]
                raise ArtifactError(f"{self.path} has no LoRA slots (compile it with --lora-slots N)"
                                    + (f"; it has the adapter {merged[0]} merged in" if merged else ""))
            return {}, {}
        from kiln.runtime.lora import slot_tensors

        return slot_tensors(record, lora, str(self.path)) if lora else ({}, {})

    def adapter_slot(self, adapter: str | None) -> int:
        """The slot of a loaded adapter (None: 0, the base model); an unknown name is one line."""
        if adapter is None:
            return 0
        if adapter not in self.adapters:
            known = ", ".join(self.adapters) or "none loaded"
            raise ArtifactError(f"{self.path}: no LoRA adapter named {adapter!r} (loaded: {known})")
        return self.adapters[adapter]

    def _load_tokenizer(self, name: str) -> Tokenizer:
        file = self.path / name  # inside the artifact: check_paths
        if not file.is_file():
            raise ArtifactError(f"{self.path}: the tokenizer {name} (manifest `tokenizer`) is missing")
        try:
            return Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises its own Exception type for an empty or garbage file
            raise ArtifactError(f"{self.path}: the tokenizer {name} cannot be read: {_first_line(exc)}") from exc

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ArtifactError(f"{self.path}: the artifact has no tokenizer; pass token ids instead")
        return self.tokenizer

    # --- causal LM ----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._need_tokenizer().encode(check_text(text, "the prompt")).ids

    def chat_prompt(self, user_message: str) -> str:
        """The prompt text for one user turn, rendered with the model's chat template."""
        template = self.manifest.get("generation", {}).get("chat_template")
        if not template:
            raise ArtifactError(f"{self.path}: the model has no chat template")
        return render_chat_template(template, [{"role": "user", "content": check_text(user_message, "the prompt")}],
                                    where=f"{self.path}: the chat template (generation.chat_template)")

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

    @property
    def max_positions(self) -> int | None:
        """A causal LM's limit on prompt + generated tokens (kv_cache.max_positions), if recorded."""
        return self._lm().max_positions

    def generate(self, prompt: str | list[int], max_new_tokens: int | None = None,
                 on_token: Callable[[int], None] | None = None, speculative=None, adapter: str | None = None,
                 **sampling) -> Generation:
        """Continue one prompt (greedy unless temperature > 0), streaming tokens to `on_token`.
        `speculative`: "lookup", a draft artifact (its path or `Artifact`) or a `Speculation`.
        `adapter`: the name of a LoRA adapter loaded with `kiln.load(..., lora={name: folder})`."""
        model, prompt_ids = self._lm(), self._ids(prompt)
        params = self._params(max_new_tokens, **sampling)
        slot = self._slot_for(adapter, speculative)
        batcher = self.generator(speculative)
        new: list[int] = []
        for token in generate_stream(model, prompt_ids, params, batcher, adapter=slot):
            new.append(token)
            if on_token:
                on_token(token)
        return self._result(prompt_ids, new, params, batcher)

    def generate_batch(self, prompts: list[str | list[int]], max_new_tokens: int | None = None,
                       adapters: list[str | None] | None = None, **sampling) -> list[Generation]:
        """Static batching: all prompts padded into one batch; `adapters`: each prompt's LoRA adapter."""
        ids = [self._ids(p) for p in prompts]
        params = self._params(max_new_tokens, **sampling)
        slots = self._slots(adapters, len(ids))
        outs = generate_batch(self._lm(), ids, params, slots)
        return [self._result(p, o, params) for p, o in zip(ids, outs)]

    def generate_continuous(self, prompts: list[str | list[int]], max_new_tokens: int | None = None,
                            arrivals: list[int] | None = None, speculative=None,
                            adapters: list[str | None] | None = None, **sampling) -> list[Generation]:
        """Continuous batching: request i joins at decode step arrivals[i], with LoRA adapter adapters[i]."""
        ids = [self._ids(p) for p in prompts]
        params = self._params(max_new_tokens, **sampling)
        slots = self._slots(adapters, len(ids), speculative)
        outs = run_requests(self._lm(), [(p, params, a) for p, a in zip(ids, slots or [0] * len(ids))], arrivals,
                            batcher=self.generator(speculative))
        return [self._result(p, o, params) for p, o in zip(ids, outs)]

    def _slot_for(self, adapter: str | None, speculative=None) -> int:
        slot = self.adapter_slot(adapter)
        if slot and speculative is not None:
            raise ArtifactError("speculative decoding with a LoRA adapter is not supported yet (the draft has no "
                                "adapter)")
        return slot

    def _slots(self, adapters: list[str | None] | None, rows: int, speculative=None) -> list[int] | None:
        if adapters is None:
            return None
        if len(adapters) != rows:
            raise ArtifactError(f"{len(adapters)} adapters for {rows} prompts")
        return [self._slot_for(a, speculative) for a in adapters]

    def beam_search(self, prompt: str | list[int], num_beams: int = 4, max_new_tokens: int | None = None,
                    length_penalty: float = 1.0) -> Generation:
        params = self._params(max_new_tokens)
        prompt_ids = self._ids(prompt)
        tokens = beam_search(self._lm(), prompt_ids, num_beams, params.max_new_tokens, length_penalty)
        return self._result(prompt_ids, tokens, params)

    def generator(self, speculative=None) -> Generator:
        """A continuous-batching generator over this artifact: submit(ids, SamplingParams), step(),
        cancel(); with `speculative` (as in `generate`), each row speculates."""
        if speculative is None:
            return Generator(self._lm())
        return SpeculativeGenerator(self._lm(), self.speculation(speculative))

    def speculation(self, speculative, **options) -> Speculation:
        """`speculative` as a `Speculation` that this artifact can serve (else one line): "lookup",
        "draft" (the draft bundled by `kiln compile --draft`, manifest `draft`), a draft artifact (a
        path or an `Artifact`, refused unless a causal LM with this artifact's tokenizer) or a
        `Speculation` as is; `options` are Speculation's other fields (draft_tokens, ...)."""
        spec = self._speculation(speculative, **options)
        check_model(self._lm(), "the artifact")
        check_exact(self._lm(), spec)
        return spec

    def _speculation(self, speculative, **options) -> Speculation:
        if isinstance(speculative, Speculation):
            return speculative
        if speculative == "lookup":
            return Speculation("lookup", **options)
        if speculative == "draft":
            if "draft" not in self.manifest:
                raise SpeculationError(f"{self.path} has no bundled draft (manifest `draft`): compile it with --draft, "
                                       f"or give a draft artifact's directory")
            speculative = artifact_path(self.path, self.manifest["draft"]["path"], "draft.path")
        draft = speculative if isinstance(speculative, Artifact) else Artifact(speculative, threads=self.threads)
        if draft.task != "causal-lm":
            raise SpeculationError(f"the draft {draft.path} is a {draft.task} artifact, not a causal LM")
        if self.tokenizer is None or draft.tokenizer is None or draft.tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise SpeculationError(f"the draft {draft.path} does not have this artifact's tokenizer: its tokens would "
                                   f"mean other text")
        return Speculation(draft._lm(), **options)

    def _result(self, prompt_ids: list[int], new: list[int], params: SamplingParams,
                batcher: Generator | None = None) -> Generation:
        stops = set(params.stop_token_ids if params.stop_token_ids is not None else self._lm().eos)
        text = self.tokenizer.decode(new, skip_special_tokens=True) if self.tokenizer else ""
        stats = batcher.stats.as_dict() if isinstance(batcher, SpeculativeGenerator) else None
        return Generation(prompt_ids, new, text, "stop" if new and new[-1] in stops else "length", stats)

    # --- embeddings ---------------------------------------------------------------
    def embed(self, texts: list[str]) -> np.ndarray:
        if self.task != "embedding":
            raise ArtifactError(f"{self.path}: a {self.task} artifact does not produce embeddings")
        feeds = self.tokenize_batch(texts)
        with graph_failures(str(self.path)):
            (embedding,) = self.session.run(["embedding"], feeds)
        return embedding

    def tokenize_batch(self, texts: list[str], pairs: list[str] | None = None, max_length: int | None = None,
                       pad_id: int = 0) -> dict[str, np.ndarray]:
        """Encoder feeds for `texts` (or the pairs (texts[i], pairs[i]), encoded as the tokenizer
        encodes a pair: [CLS] a [SEP] b [SEP], type ids 0 then 1), padded at the end to the
        longest with `pad_id` and truncated to `max_length` tokens (default: the embedding's limit, else 512)."""
        tok = self._need_tokenizer()
        if not texts:
            raise ArtifactError("no text given")
        if pairs is not None and len(pairs) != len(texts):
            raise ArtifactError(f"{len(texts)} texts but {len(pairs)} pairs: give one pair per text")
        max_len = max_length or self.manifest.get("embedding", {}).get("max_sequence_length") or 512
        # Truncation in the tokenizer keeps the special tokens ([CLS] ... [SEP]) intact.
        tok.enable_truncation(max_len)
        tok.no_padding()  # some tokenizer.json files pad to a fixed length; pad to the batch instead
        texts = [check_text(t, "a text") for t in texts]
        pairs = [check_text(p, "a pair text") for p in pairs] if pairs is not None else None
        encodings = tok.encode_batch(list(zip(texts, pairs)) if pairs is not None else list(texts))
        length = max(len(e.ids) for e in encodings)
        feeds = {name: np.zeros((len(texts), length), dtype=np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
        feeds["input_ids"][:] = pad_id
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            feeds["input_ids"][row, :n] = enc.ids
            feeds["attention_mask"][row, :n] = 1
            feeds["token_type_ids"][row, :n] = enc.type_ids
        return {k: v for k, v in feeds.items() if k in self.input_names}

    # --- sequence classification (cross-encoders, classifiers) -------------------------
    @property
    def classification(self) -> Classification:
        if self.task != "sequence-classification":
            raise ArtifactError(f"{self.path}: a {self.task} artifact does not classify text")
        return Classification.from_manifest(self.manifest["classification"])

    def classify(self, texts: str | list[str], pairs: str | list[str] | None = None) -> list[Scores]:
        """Scores per text (or per (text, pair): a cross-encoder's query and passage), by label."""
        spec = self.classification
        texts = [texts] if isinstance(texts, str) else list(texts)
        pairs = [pairs] if isinstance(pairs, str) else (list(pairs) if pairs is not None else None)
        feeds = self.tokenize_batch(texts, pairs, spec.max_sequence_length, self.pad_id)
        with graph_failures(str(self.path)):
            (logits,) = self.session.run(["logits"], feeds)
        if logits.ndim != 2 or logits.shape[1] != len(spec.labels):
            raise ArtifactError(f"{self.path}: logits of shape {list(logits.shape)}, but the manifest names "
                                f"{len(spec.labels)} labels")
        return [Scores(list(spec.labels), row, class_scores(row, spec.problem_type), spec.problem_type)
                for row in logits]


def class_scores(logits: np.ndarray, problem_type: str) -> np.ndarray:
    """softmax (single-label), sigmoid (multi-label) or the logits themselves (regression)."""
    x = logits.astype(np.float64)
    if problem_type == "regression":
        return x
    if problem_type == "multi_label_classification":
        return 1.0 / (1.0 + np.exp(-x))
    e = np.exp(x - x.max())
    return e / e.sum()


def load(path: str | Path, threads: int | None = None, verify: bool = False,
         lora: dict[str, str | Path] | None = None) -> Artifact:
    """Open an artifact; `verify` also checks every file's sha256 against the manifest; `lora`: name
    -> PEFT adapter folder, loaded into the artifact's LoRA slots (docs/lora.md)."""
    return Artifact(path, threads=threads, verify=verify, lora=lora)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_text(text, what: str) -> str:
    """`text` if it is a str that encodes as UTF-8 (no lone surrogates), else one line."""
    if not isinstance(text, str):
        raise ArtifactError(f"{what} is not text ({type(text).__name__})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start:exc.end].encode("unicode_escape").decode("ascii")
        raise ArtifactError(f"{what} is not valid UTF-8 text (character {bad} at {exc.start}: a lone surrogate, "
                            f"from bytes that are not UTF-8?)") from exc
    return text


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         where: str = "the chat template", **extra) -> str:
    """A chat template rendered as transformers renders it: in jinja2's immutable sandbox (a
    template from an artifact runs no code), with trim_blocks and lstrip_blocks, the loopcontrols
    extension, and the globals `raise_exception` and `strftime_now` and the filter `tojson`
    (transformers' own). A template that tries to leave the sandbox, fails to parse or raises
    is one line naming it."""
    import json
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.exceptions.SecurityError as exc:
        raise ArtifactError(f"{where} tried to reach outside jinja2's sandbox ({_first_line(exc)}): refused") from exc
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ArtifactError(f"{where} is not a valid Jinja template (line {exc.lineno}: {_first_line(exc)})") from exc
    except Exception as exc:  # raise_exception, undefined names, type errors inside the template
        raise ArtifactError(f"{where} cannot be rendered: {type(exc).__name__}: {_first_line(exc)}") from exc

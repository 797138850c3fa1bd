"""Generation over a causal-LM artifact, driven only by its manifest.

With a KV cache (manifest `kv_cache`): prefill once, then one token per step through the
cache. Without one: the full sequence is recomputed every step.

Batching:
- static (`generate_batch`): prompts are left-padded to one length; `attention_mask` marks
  the padding and `position_ids` count only real tokens, so each row computes what it
  would alone (if the layout says `padded_prefill: false`, prompts are prefilled one by one
  and then decoded together);
- continuous (`Generator`): a request is prefilled alone when it joins, its cache
  is left-padded to the batch's length and stacked in; finished rows leave between steps.
  With `prefill_chunk=N`, a step prefills at most N prompt tokens (a long prompt over several
  steps, on its own cache) before decoding the running rows, so a joining request delays the
  others' next token by at most one chunk's prefill. A row whose prefill or sampling raises is
  reported in `failed` and leaves; the other rows go on.
  Masked cache slots get exactly zero attention weight, so a row's tokens are the same as
  when it runs alone.

Decoding: greedy by default; temperature / top-k / top-p sampling with a per-request seed;
beam search (`beam_search`) over the cache, the beams being rows of one batch. Speculative
decoding (several tokens verified per forward through `forward_all`, rejected slots forgotten by
`truncate`) is kiln.runtime.speculative's `SpeculativeGenerator`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
import onnxruntime as ort

from kiln.backends.static import check_chunk_room, chunk_spans, pad_chunk
from kiln.errors import KilnError
from kiln.manifest import KVLayout, SessionSettings


class GenerationError(KilnError, ValueError):
    """A request the artifact cannot serve (too long for its cache, empty prompt, ...)."""


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] | None = None  # None = the manifest's eos ids


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.temperature <= 0:
        return int(np.argmax(logits))
    order, probs = _candidates(logits, params)
    return int(rng.choice(order, p=probs))


def distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The probabilities `choose` samples from (temperature > 0), over the whole vocabulary."""
    order, probs = _candidates(logits, params)
    out = np.zeros(logits.shape[-1])
    out[order] = probs
    return out


def _candidates(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The tokens temperature / top-k / top-p leave, most likely first, and their probabilities."""
    x = logits.astype(np.float64) / params.temperature
    order = np.argsort(-x)
    if params.top_k > 0:
        order = order[: params.top_k]
    probs = np.exp(x[order] - x[order[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return order, probs


def _runtime_failure(exc: BaseException) -> bool:
    """Whether `exc` is the inference engine refusing the graph at run time (a node that fails on
    the inputs it gets), as opposed to a bug in this module."""
    module = type(exc).__module__ or ""
    return (module.startswith(("onnxruntime", "tvm")) or
            (isinstance(exc, RuntimeError) and str(exc).startswith("Error in execution")))


@contextlib.contextmanager
def graph_failures(where: str):
    """An error of the engine while running the artifact's graph, as one line (the graph is
    damaged, or does not do what its manifest says); anything else propagates unchanged."""
    try:
        yield
    except KilnError:
        raise
    except Exception as exc:
        if not _runtime_failure(exc):
            raise
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise GenerationError(f"{where}: the graph failed to run ({first}): the artifact is damaged or does not "
                              f"match its manifest") from exc


class Model:
    """A causal-LM session plus its cache layout (from the manifest)."""

    def __init__(self, session, manifest: dict):
        self.session = session
        self.manifest = manifest
        self.kv = manifest.get("kv_cache")  # the manifest's section as written (a dict)
        self.layout: KVLayout | None = KVLayout.from_manifest(self.kv)
        self.output_names = [o.name for o in session.get_outputs()]
        lora = manifest.get("lora") or {}
        # LoRA slots (kiln compile --lora-slots): each row's adapter slot, 0 = the base model
        self.index_input = lora.get("index_input") if lora.get("mode") == "slots" else None
        if self.layout is not None:
            graph_inputs = len(session.get_inputs())
            if not 0 < self.layout.num_layers <= graph_inputs:  # before 2 x num_layers names are made
                raise GenerationError(f"the manifest's kv_cache.num_layers is {self.layout.num_layers}, but the graph has "
                                      f"{graph_inputs} inputs: the manifest does not describe this graph")
            # Cache names from the manifest's templates (docs/manifest.md), never assumed.
            self.past_names = [n for pair in self.layout.past_names for n in pair]
            self.present_names = [n for pair in self.layout.present_names for n in pair]
            self._check_names()
        self._check_io()
        gen = manifest.get("generation", {})
        self.eos = tuple(gen.get("eos_token_ids", []))
        self.pad = gen.get("pad_token_id") if gen.get("pad_token_id") is not None else (self.eos[0] if self.eos else 0)
        # A static-shape artifact (ORT, target npu) takes a fixed number of tokens per call.
        self.chunk = SessionSettings.from_manifest(manifest.get("backend", {})).chunk
        # Past and present in one preallocated buffer (ORT on the CPU, where the buffer lives).
        providers = session.get_providers() if hasattr(session, "get_providers") else []
        self.shared = bool(self.layout and self.layout.shared_buffer and not self.static
                           and providers == ["CPUExecutionProvider"])
        self._binding = None  # the IOBinding kept across shared-buffer steps (see _run_shared)
        self._cache_out = None  # the cache list the last shared-buffer step returned
        logits = next((o for o in session.get_outputs() if o.name == "logits"), None) if self.shared else None
        self._logits_spec = ((logits.shape[-1], np.float16 if logits.type == "tensor(float16)" else np.float32)
                             if logits is not None and isinstance(logits.shape[-1], int) else None)

    def _check_io(self) -> None:
        """The graph takes exactly the inputs this runtime feeds (by the manifest's kv_cache) and
        returns `logits`: a disagreement is one line at load, not an ORT error mid-generation."""
        inputs = [i.name for i in self.session.get_inputs()]
        if self.layout is None:
            fed, how = ["input_ids"], "the manifest has no kv_cache, so only input_ids is fed"
        else:
            fed = ["input_ids", "attention_mask", "position_ids", *self.past_names]
            fed += ["cache_position"] if self.static else []
            how = "the runtime feeds input_ids, attention_mask, position_ids and the kv_cache's past inputs"
        if self.index_input:
            fed, how = [*fed, self.index_input], how + ", and the LoRA slots' index"
        extra = next((n for n in inputs if n not in fed), None)
        if extra is not None:
            raise GenerationError(f"the graph takes an input '{extra}' that the manifest does not account for "
                                  f"({how}): the manifest does not describe this graph")
        absent = next((n for n in fed if n not in inputs), None)
        if absent is not None:
            raise GenerationError(f"the graph has no input '{absent}' ({how}): the manifest does not describe this graph")
        if "logits" not in self.output_names:
            raise GenerationError("the graph has no output 'logits': the manifest does not describe this graph")

    def _check_names(self) -> None:
        inputs = {i.name for i in self.session.get_inputs()}
        missing = next((n for n in self.past_names if n not in inputs), None) or next(
            (n for n in self.present_names if n not in self.output_names), None)
        if missing:
            raise GenerationError(f"kv_cache names '{missing}' (from its past/present templates) but the graph has no "
                                  f"such {'input' if missing in self.past_names else 'output'}")
        self._check_shapes()

    def _check_shapes(self) -> None:
        """The manifest's kv_cache (heads, head sizes, static slots, dtype) against the graph's
        declared cache inputs, so a disagreement is one line at load, not an error mid-generation.
        Symbolic or unknown sizes (and sessions that declare none, e.g. TVM's) are not checked."""
        kv = self.layout
        wanted_type = {"float": "tensor(float)", "float16": "tensor(float16)"}.get(kv.dtype)
        declared = {i.name: i for i in self.session.get_inputs()}
        for j, name in enumerate(self.past_names):
            value = declared[name]
            shape, kind = getattr(value, "shape", None), getattr(value, "type", None)
            if wanted_type and isinstance(kind, str) and kind != wanted_type:
                raise GenerationError(f"the manifest's kv_cache.dtype is {kv.dtype}, but the graph's cache input "
                                      f"'{name}' is {kind}: the manifest does not describe this graph")
            if not isinstance(shape, (list, tuple)):
                continue
            if len(shape) != 4:
                raise GenerationError(f"the graph's cache input '{name}' has {len(shape)} axes; the manifest's kv_cache "
                                      f"describes 4 (batch, kv_heads, sequence, head_dim)")
            expected = {1: ("kv_heads", kv.kv_heads),
                        3: ("value_head_dim", kv.value_head_dim) if j % 2 else ("head_dim", kv.head_dim)}
            if self.static:
                expected[2] = ("max_length", kv.max_length)
            for axis, (field, size) in expected.items():
                if isinstance(shape[axis], int) and shape[axis] != size:
                    raise GenerationError(f"the manifest's kv_cache.{field} is {size}, but the graph's cache input "
                                          f"'{name}' has {shape[axis]} on axis {axis}: the manifest does not describe "
                                          f"this graph")

    @property
    def static(self) -> bool:
        return bool(self.layout and self.layout.static)

    @property
    def max_positions(self) -> int | None:
        """Positions must stay below this (kv_cache.max_positions): prompt + generated tokens."""
        return self.layout.max_positions if self.layout else None

    def check_prompt(self, length: int) -> None:
        """Refuse a prompt that leaves no position for a new token."""
        limit = self.max_positions
        if limit is not None and length >= limit:
            raise GenerationError(f"the prompt has {length} tokens; the model takes at most {limit} positions "
                                  f"(kv_cache.max_positions), prompt and new tokens together")

    def room(self, length: int) -> bool:
        """Whether a sequence of `length` tokens may grow by one: the sequence stays within
        max_positions and, for a static cache, within its slots (feeding the last token takes a
        whole chunk of slots if chunked)."""
        limit = self.max_positions
        if limit is not None and length >= limit:
            return False
        # a static cache holds the whole sequence, and a chunked one needs a chunk of slots for the last token
        return not self.static or (length < self.layout.max_length
                                   and length - 1 + (self.chunk or 1) <= self.layout.max_length)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        kv = self.layout
        dtype = np.float16 if kv.dtype == "float16" else np.float32
        length = kv.max_length if self.static else 0
        shapes = [(batch, kv.kv_heads, length, kv.head_dim), (batch, kv.kv_heads, length, kv.value_head_dim)]
        try:
            return [np.zeros(shapes[j % 2], dtype=dtype) for j in range(2 * kv.num_layers)]
        except (MemoryError, ValueError) as exc:  # a declared size no machine holds (ValueError: too big for numpy)
            need = 2 * kv.num_layers * batch * kv.kv_heads * length * (kv.head_dim + kv.value_head_dim) // 2
            raise GenerationError(f"the cache the manifest declares (kv_cache: {kv.num_layers} layers x {kv.kv_heads} heads "
                                  f"x {length} slots) needs {need * np.dtype(dtype).itemsize:,} bytes: more than can "
                                  f"be allocated") from exc

    def forward(self, input_ids, attention_mask, position_ids, cache, adapters=None):
        """Returns (last-position logits [B, V], new cache). `adapters`: each row's LoRA slot
        (artifacts compiled with --lora-slots; default 0, the base model).

        `attention_mask` covers the slots used so far including the new tokens ([B, P + S]);
        for a static cache it is padded to the fixed length and the write slots are added.
        The cache passed in is consumed: a shared-buffer cache is updated in place.
        """
        logits, present = self._run(input_ids, attention_mask, position_ids, cache, adapters)
        return logits[:, -1], present

    def forward_all(self, input_ids, attention_mask, position_ids, cache, adapters=None):
        """`forward`, with the logits at every new position ([B, S, V])."""
        return self._run(input_ids, attention_mask, position_ids, cache, adapters)

    def truncate(self, cache, length: int) -> list:
        """A growing cache cut back to its first `length` slots (the later ones are forgotten):
        with the shared buffer, a slot count (the free slots are overwritten by the next step)."""
        if all(isinstance(entry, SharedSlots) for entry in cache):
            for entry in cache:
                entry.length = length
            return cache
        return [host(entry)[:, :, :length] for entry in cache]

    def all_logits(self, input_ids: np.ndarray, adapters=None) -> np.ndarray:
        """Logits at every position [B, S, V] for unpadded sequences, from an empty cache."""
        batch, seq = input_ids.shape
        if self.kv is None:
            return self._run(input_ids, None, None, None, adapters)[0]
        positions = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        return self._run(input_ids, np.ones_like(input_ids), positions, self.empty_cache(batch), adapters)[0]

    def _run(self, input_ids, attention_mask, position_ids, cache, adapters=None):
        with graph_failures("the model"):
            return self._run_graph(input_ids, attention_mask, position_ids, cache, adapters)

    def _index_feed(self, batch: int, adapters) -> dict:
        if not self.index_input:
            if adapters is not None and any(adapters):
                raise GenerationError("this artifact has no LoRA slots (compile it with --lora-slots N)")
            return {}
        index = np.zeros(batch, dtype=np.int64) if adapters is None else np.asarray(adapters, dtype=np.int64)
        if index.shape != (batch,):
            raise GenerationError(f"{index.size} adapter slots for {batch} rows")
        return {self.index_input: index}

    def _run_graph(self, input_ids, attention_mask, position_ids, cache, adapters=None):
        if self.kv is None:
            (logits,) = self.session.run(["logits"], {"input_ids": input_ids,
                                                      **self._index_feed(input_ids.shape[0], adapters)})
            return logits, None
        if self.chunk and input_ids.shape[1] != self.chunk:
            return self._run_chunks(input_ids, attention_mask, position_ids, cache, adapters)
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                 **self._index_feed(input_ids.shape[0], adapters)}
        if self.static:
            used, new, length = attention_mask.shape[1], input_ids.shape[1], self.layout.max_length
            if used > length:
                raise GenerationError(f"the sequence ({used} tokens) exceeds the static cache length {length}")
            mask = np.zeros((attention_mask.shape[0], length), dtype=np.int64)
            mask[:, :used] = attention_mask
            feeds["attention_mask"] = mask
            feeds["cache_position"] = np.arange(used - new, used, dtype=np.int64)
        limit = self.max_positions  # callers stop before it (check_prompt, room): a safety net
        if limit is not None and int(position_ids.max()) >= limit:
            raise GenerationError(f"position {int(position_ids.max())} is past the model's {limit} positions "
                                  f"(kv_cache.max_positions)")
        if self.shared:
            return self._run_shared(feeds, cache)
        feeds.update(zip(self.past_names, cache))
        # The session's own values in and out (OrtValues, or TVM tensors for a TVM artifact): the
        # cache goes from one step's outputs to the next step's inputs without a copy into numpy
        # (the whole cache, every token, otherwise).
        feeds = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                 for k, v in feeds.items()}
        named = dict(zip(self.output_names, self.session.run_with_ort_values(self.output_names, feeds)))
        present = [named[n] for n in self.present_names]
        return named["logits"].numpy(), present


    def _run_shared(self, feeds, cache):
        """One call with past and present bound to the same buffers: the new tokens' K/V are
        written into free slots of the buffer, nothing is copied. A buffer that is too short
        (or a cache that a caller re-built as arrays) is copied once into a buffer twice as long."""
        total = feeds["attention_mask"].shape[1]
        # The previous step's cache comes back as the same list: its buffers are bound already.
        same = cache is self._cache_out and cache[0].capacity >= total
        slots = cache if same else [entry if isinstance(entry, SharedSlots) and entry.capacity >= total
                                    else SharedSlots.allocate(host(entry), self._capacity(total)) for entry in cache]
        # One binding kept across steps: the cache buffers are rebound only when they change and a
        # decode step's logits land in a kept array, because 120 binds and 61 output wrappers per
        # step cost SmolLM2 about 0.8 ms of a 7 ms step in Python.
        if self._binding is None:
            self._binding, self._bound, self._logits = self.session.io_binding(), None, None
            self._binding.bind_output("logits")  # bound first: get_outputs()[0]
        binding = self._binding
        inputs = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]
        for name, value in zip(feeds, inputs):
            binding.bind_ortvalue_input(name, value)
        values = self._bound if same else [s.value for s in slots]
        if self._bound is None or len(values) != len(self._bound) or any(a is not b for a, b in zip(values, self._bound)):
            for past, present, value in zip(self.past_names, self.present_names, values):
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            self._bound = values
        batch, new = feeds["input_ids"].shape
        kept = new == 1 and self._logits_spec is not None
        if kept:
            if self._logits is None or self._logits[0].shape[0] != batch:
                vocab, dtype = self._logits_spec
                array = np.empty((batch, 1, vocab), dtype=dtype)
                self._logits = (array, ort.OrtValue.ortvalue_from_numpy(array))
            binding.bind_ortvalue_output("logits", self._logits[1])
        else:
            binding.bind_output("logits")
        self.session.run_with_iobinding(binding)
        # a copy: the kept array is the next decode step's output
        logits = self._logits[0].copy() if kept else binding.get_outputs()[0].numpy()
        for entry in slots:  # the cache passed in is consumed: its entries are updated in place
            entry.length = total
        self._cache_out = slots
        return logits, slots

    def _capacity(self, total: int) -> int:
        # The next power of two above `total`: a prefill leaves room to decode, where growing
        # the buffer (a copy of the whole cache) would cost several decode steps.
        capacity = max(256, 1 << total.bit_length())
        limit = self.max_positions
        return max(total, min(capacity, limit)) if limit else capacity

    def _run_chunks(self, input_ids, attention_mask, position_ids, cache, adapters=None):
        """Tokens in fixed chunks through the static cache: the last chunk is padded, its padding
        written to the free slots after the real tokens (masked out, overwritten later), so a
        call needs `chunk` free slots and only the real positions' logits are returned."""
        chunk = self.chunk
        batch, seq = input_ids.shape
        start = attention_mask.shape[1] - seq
        try:
            check_chunk_room(start, seq, chunk, self.layout.max_length)
        except KilnError as exc:
            raise GenerationError(str(exc)) from None
        logits = []
        for begin, real in chunk_spans(seq, chunk):
            # the padding repeats the last token and position (kiln.backends.static.pad_chunk); the
            # mask's zeros after the real slots hide it, and static `cache_position` puts it there
            step = pad_chunk({"input_ids": input_ids[:, begin:begin + real],
                              "position_ids": position_ids[:, begin:begin + real]},
                             {"input_ids": 1, "position_ids": 1}, chunk, start + begin + real)
            mask = attention_mask[:, :start + begin + real]
            padded = np.concatenate([mask, np.zeros((batch, chunk - real), dtype=np.int64)], axis=1)
            out, cache = self._run(step["input_ids"], padded, step["position_ids"], cache, adapters)
            logits.append(out[:, :real])
        return np.concatenate(logits, axis=1), cache


def left_pad(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def generate_stream(model: Model, prompt: list[int], params: SamplingParams,
                    batcher: Generator | None = None, adapter: int = 0) -> Iterator[int]:
    """One request, token by token (through `batcher`, default a new `Generator`), with LoRA slot `adapter`."""
    batcher = batcher or Generator(model)
    rid = batcher.submit(prompt, params, adapter) if adapter else batcher.submit(prompt, params)
    while batcher.busy:
        for req_id, token in batcher.step():
            if req_id == rid:
                yield token
        if batcher.failed:
            raise batcher.failed[0][1]


def generate_batch(model: Model, prompts: list[list[int]], params: SamplingParams,
                   adapters: list[int] | None = None) -> list[list[int]]:
    """Static batching: all prompts left-padded and decoded together (`adapters`: each prompt's
    LoRA slot, default 0)."""
    if model.layout is None or not model.layout.padded_prefill:
        # Prefill each prompt alone, decode together (the layout forbids padded prefill).
        return run_requests(model, [(p, params, a) for p, a in zip(prompts, adapters or [0] * len(prompts))])
    for p in prompts:
        model.check_prompt(len(p))
    stops = set(params.stop_token_ids if params.stop_token_ids is not None else model.eos)
    rngs = [np.random.default_rng(params.seed) for _ in prompts]
    ids, mask, positions = left_pad(prompts, model.pad)
    logits, cache = model.forward(ids, mask, positions, model.empty_cache(len(prompts)), adapters)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    next_pos = positions[:, -1] + 1
    for _ in range(params.max_new_tokens):
        tokens = []
        for row in range(len(prompts)):
            token = choose(logits[row], params, rngs[row])
            tokens.append(token)
            if not done[row]:
                outputs[row].append(token)
                done[row] = (token in stops or len(outputs[row]) >= params.max_new_tokens
                             or not model.room(len(prompts[row]) + len(outputs[row])))
        if all(done):
            break
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        logits, cache = model.forward(np.array(tokens, dtype=np.int64)[:, None], mask, next_pos[:, None], cache,
                                      adapters)
        next_pos = next_pos + 1
    return outputs


@dataclasses.dataclass
class Row:
    """A request in a `Generator`."""

    rid: int
    params: SamplingParams
    rng: np.random.Generator
    tokens: list[int]  # prompt + generated (full recompute needs them all)
    generated: int = 0
    next_position: int = 0
    prefilled: int = 0  # prompt tokens in `cache` so far (chunked prefill)
    cache: list | None = None  # the row's own cache while it is prefilled in chunks
    adapter: int = 0  # its LoRA slot (artifacts compiled with --lora-slots; 0 = the base model)


class Generator:
    """Continuous batching: requests join (`submit`) and leave (finish or `cancel`) between
    decode steps; each `step()` returns one (request id, token) per running request."""

    def __init__(self, model: Model, prefill_chunk: int | None = None):
        self.model = model
        self.waiting: list[Row] = []
        self.rows: list[Row] = []
        self.cache: list[np.ndarray] | None = None
        self.mask: np.ndarray | None = None  # [B, T]
        self.logits: np.ndarray | None = None  # [B, V] for each row's next token
        self._next_id = 0
        if prefill_chunk is not None and prefill_chunk < 1:
            raise GenerationError(f"prefill_chunk must be at least 1; got {prefill_chunk}")
        # Chunks need a growing cache fed any number of tokens (not a static or fixed-chunk graph).
        chunkable = model.kv is not None and not model.static and not model.chunk
        self.prefill_chunk = prefill_chunk if chunkable else None
        self.failed: list[tuple[int, Exception]] = []  # rows that raised; the caller clears it

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.rows)

    @property
    def active(self) -> set[int]:
        """Ids of the requests still waiting, prefilling or decoding."""
        return {r.rid for r in self.waiting} | {r.rid for r in self.rows}

    def submit(self, prompt: list[int], params: SamplingParams | None = None, adapter: int = 0) -> int:
        """Queue a request; `adapter` is its LoRA slot (Artifact.adapters maps names to slots)."""
        if not prompt:
            raise GenerationError("empty prompt")
        self.model._index_feed(1, [adapter])  # an artifact without slots refuses an adapter now
        self.model.check_prompt(len(prompt))
        params = params or SamplingParams()
        rid = self._next_id
        self._next_id += 1
        self.waiting.append(Row(rid, params, np.random.default_rng(params.seed), list(prompt), adapter=adapter))
        return rid

    def cancel(self, rid: int) -> None:
        """Remove a request (waiting or running) before its next step."""
        self.waiting = [r for r in self.waiting if r.rid != rid]
        keep = [i for i, r in enumerate(self.rows) if r.rid != rid]
        if len(keep) != len(self.rows):
            self._retain(keep)

    def _prefill(self, row: Row, budget: int | None) -> int:
        """Feed up to `budget` more prompt tokens (all if None) into the row's own cache; the row
        joins the batch once its whole prompt is in. Returns the tokens fed."""
        m = self.model
        if m.kv is None or budget is None and not row.prefilled:
            self._admit(row)
            return len(row.tokens)
        start = row.prefilled
        end = len(row.tokens) if budget is None else min(len(row.tokens), start + budget)
        ids = np.array([row.tokens[start:end]], dtype=np.int64)
        positions = np.arange(start, end, dtype=np.int64)[None]
        logits, row.cache = m.forward(ids, np.ones((1, end), dtype=np.int64), positions,
                                      row.cache if start else m.empty_cache(1), [row.adapter])
        row.prefilled = end
        if end == len(row.tokens):
            cache, row.cache = row.cache, None
            self._join(row, logits, cache)
        return end - start

    def _admit(self, row: Row) -> None:
        m = self.model
        ids = np.array([row.tokens], dtype=np.int64)
        if m.kv is None:
            logits, _ = m.forward(ids, None, None, None, [row.adapter])
            self.rows.append(row)
            self.logits = logits if self.logits is None else np.concatenate([self.logits, logits])
            return
        mask = np.ones_like(ids)
        positions = np.arange(ids.shape[1], dtype=np.int64)[None]
        logits, cache = m.forward(ids, mask, positions, m.empty_cache(1), [row.adapter])
        self._join(row, logits, cache)

    def _join(self, row: Row, logits: np.ndarray, cache) -> None:
        """A prefilled row enters the batch: its cache left-padded to the batch's length and stacked in."""
        m = self.model
        mask = np.ones((1, len(row.tokens)), dtype=np.int64)
        row.next_position = len(row.tokens)
        if not self.rows:
            self.cache, self.mask, self.logits = cache, mask, logits
        elif m.static:
            raise GenerationError("continuous batching needs a growing cache; this artifact's cache is static")
        else:
            t_old, t_new = self.mask.shape[1], mask.shape[1]
            width = max(t_old, t_new)
            self.cache = [np.concatenate([_pad_seq(host(a), width), _pad_seq(host(b), width)])
                          for a, b in zip(self.cache, cache)]
            self.mask = np.concatenate([_pad_mask(self.mask, width), _pad_mask(mask, width)])
            self.logits = np.concatenate([self.logits, logits])
        self.rows.append(row)

    def step(self) -> list[tuple[int, int]]:
        """Admit waiting requests (at most `prefill_chunk` prompt tokens of them, if set), choose
        one token per row, retire finished rows, decode."""
        self._admit_waiting()
        return self._advance() if self.rows else []

    def _admit_waiting(self) -> None:
        budget = self.prefill_chunk
        while self.waiting and (budget is None or budget > 0):
            row = self.waiting[0]
            try:
                fed = self._prefill(row, budget)
            except Exception as exc:  # this row fails; the batch is untouched (it joins only when complete)
                self.waiting.pop(0)
                self.failed.append((row.rid, exc))
                continue
            if row.prefilled < len(row.tokens) and row.cache is not None:
                break  # the budget is spent mid-prompt: the rest next step
            self.waiting.pop(0)
            if budget is not None:
                budget -= fed

    def _advance(self) -> list[tuple[int, int]]:
        emitted, keep = [], []
        for i, row in enumerate(self.rows):
            try:
                token = choose(self.logits[i], row.params, row.rng)
            except Exception as exc:  # e.g. sampling parameters that give no distribution: this row leaves
                self.failed.append((row.rid, exc))
                continue
            emitted.append((row.rid, token))
            if not self._emit(row, token):
                keep.append(i)
        self._retain(keep)
        if self.rows:
            self._decode()
        return emitted

    def _emit(self, row: Row, token: int) -> bool:
        """Append a chosen token to the row; whether the row ends with it: a stop token, its
        max_new_tokens, or the model's last position (stop reason "length")."""
        row.tokens.append(token)
        row.generated += 1
        stops = row.params.stop_token_ids if row.params.stop_token_ids is not None else self.model.eos
        return token in stops or row.generated >= row.params.max_new_tokens or not self.model.room(len(row.tokens))

    def _retain(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return  # nobody left: the cache stays as it is (no copy)
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = self.logits = None
            return
        idx = np.array(keep)
        self.logits = self.logits[idx]
        if self.model.kv is None:
            return
        self.cache = [host(c)[idx] for c in self.cache]
        self.mask = self.mask[idx]
        # Slots no remaining row attends to are dropped, keeping the cache short.
        first = int(np.argmax(self.mask.any(axis=0)))
        if first and not self.model.static:
            self.cache = [c[:, :, first:] for c in self.cache]
            self.mask = self.mask[:, first:]

    def _decode(self) -> None:
        m = self.model
        if m.kv is None:
            self.logits = np.concatenate([m.forward(np.array([r.tokens], dtype=np.int64), None, None, None,
                                                    [r.adapter])[0] for r in self.rows])
            return
        ids = np.array([[r.tokens[-1]] for r in self.rows], dtype=np.int64)
        positions = np.array([[r.next_position] for r in self.rows], dtype=np.int64)
        self.mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), dtype=np.int64)], axis=1)
        self.logits, self.cache = m.forward(ids, self.mask, positions, self.cache, [r.adapter for r in self.rows])
        for r in self.rows:
            r.next_position += 1


@dataclasses.dataclass
class SharedSlots:
    """A cache entry of a shared-buffer layout: `array` [B, Hkv, capacity, Dh] (and the session
    value over the same memory), of which the first `length` slots are used."""

    array: np.ndarray
    value: ort.OrtValue
    length: int

    @classmethod
    def allocate(cls, used: np.ndarray, capacity: int) -> SharedSlots:
        array = np.zeros(used.shape[:2] + (capacity,) + used.shape[3:], dtype=used.dtype)
        array[:, :, :used.shape[2]] = used
        return cls(array, ort.OrtValue.ortvalue_from_numpy(array), used.shape[2])

    @property
    def capacity(self) -> int:
        return self.array.shape[2]

    def numpy(self) -> np.ndarray:
        return self.array[:, :, :self.length]


def host(cache) -> np.ndarray:
    """A cache entry as numpy (the runtime keeps them as the session's values between steps)."""
    return cache if isinstance(cache, np.ndarray) else cache.numpy()


def _pad_seq(cache: np.ndarray, width: int) -> np.ndarray:
    missing = width - cache.shape[2]
    if missing == 0:
        return cache
    pad = np.zeros(cache.shape[:2] + (missing,) + cache.shape[3:], dtype=cache.dtype)
    return np.concatenate([pad, cache], axis=2)


def _pad_mask(mask: np.ndarray, width: int) -> np.ndarray:
    missing = width - mask.shape[1]
    return mask if missing == 0 else np.concatenate([np.zeros((mask.shape[0], missing), dtype=mask.dtype), mask], axis=1)


def run_requests(model: Model, requests: list[tuple[list[int], SamplingParams]],
                 arrivals: list[int] | None = None, on_token: Callable[[int, int], None] | None = None,
                 batcher: Generator | None = None) -> list[list[int]]:
    """Continuous batching driver: request i joins at step arrivals[i] (default: all at once),
    through `batcher` (default a new `Generator`)."""
    arrivals = arrivals or [0] * len(requests)
    batcher = batcher or Generator(model)
    ids: dict[int, int] = {}
    out: list[list[int]] = [[] for _ in requests]
    step = 0
    pending = sorted(range(len(requests)), key=lambda i: arrivals[i])
    while pending or batcher.busy:
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            ids[batcher.submit(*requests[i])] = i
        for rid, token in batcher.step():
            out[ids[rid]].append(token)
            if on_token:
                on_token(ids[rid], token)
        if batcher.failed:  # one driver, one answer: a failing request fails the call
            raise batcher.failed[0][1]
        step += 1
    return out


def beam_search(model: Model, prompt: list[int], num_beams: int, max_new_tokens: int,
                length_penalty: float = 1.0, stop_token_ids: tuple[int, ...] | None = None) -> list[int]:
    """Beam search as transformers does with early_stopping=True: a finished hypothesis is
    scored sum(log p) / len**length_penalty (len = generated tokens); search ends when
    `num_beams` hypotheses have finished or the length limit is reached."""
    stops = set(stop_token_ids if stop_token_ids is not None else model.eos)
    model.check_prompt(len(prompt))
    if model.max_positions is not None:  # the model's last position ends the search
        max_new_tokens = min(max_new_tokens, model.max_positions - len(prompt))
    ids = np.array([prompt], dtype=np.int64)
    logits, cache = model.forward(ids, np.ones_like(ids), np.arange(len(prompt))[None],
                                  model.empty_cache(1) if model.kv else None)
    beams: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    logprobs = log_softmax(logits)
    for step in range(max_new_tokens):
        candidates = []
        for b, (score, tokens) in enumerate(beams):
            top = np.argsort(-logprobs[b])[: 2 * num_beams]
            candidates += [(score + float(logprobs[b, t]), b, int(t)) for t in top]
        candidates.sort(key=lambda c: -c[0])
        next_beams, parents = [], []
        for score, parent, token in candidates:
            tokens = beams[parent][1] + [token]
            if token in stops:
                finished.append((score / len(tokens) ** length_penalty, tokens))
            else:
                next_beams.append((score, tokens))
                parents.append(parent)
            if len(next_beams) == num_beams:
                break
        if len(finished) >= num_beams or step == max_new_tokens - 1:
            break
        beams = next_beams
        new = np.array([[t[-1]] for _, t in beams], dtype=np.int64)
        if model.kv:
            cache = [host(c)[parents] for c in cache]
            length = len(prompt) + step + 1
            logits, cache = model.forward(new, np.ones((len(beams), length), dtype=np.int64),
                                          np.full((len(beams), 1), length - 1, dtype=np.int64), cache)
        else:
            full = np.array([prompt + t for _, t in beams], dtype=np.int64)
            logits, _ = model.forward(full, None, None, None)
        logprobs = log_softmax(logits)
    pool = finished + [(score / len(tokens) ** length_penalty, tokens) for score, tokens in next_beams]
    return max(pool, key=lambda h: h[0])[1]

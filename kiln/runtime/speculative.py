"""Speculative decoding: a draft guesses up to k tokens, the target checks them in one forward.

    art.generate(prompt, speculative="lookup")            # n-grams of the prompt and the text so far
    art.generate(prompt, speculative="draft/")            # any causal-LM artifact with the same tokenizer
    Speculation(draft, draft_tokens=8)                     # the same, with the longest guess set

One step of a row whose next-token logits are known (its cache holds P tokens):
1. choose the next token x0 from the logits, as plain decoding does;
2. the draft proposes d1..dk to follow the sequence and x0;
3. the target runs [x0, d1..dk] through its cache in one call, a step of k+1 tokens at offset P
   as chunked prefill makes (the graph's mask and positions handle any offset), giving the
   logits L0..Lk, Li after x0..xi;
4. d_i is accepted while the target agrees: greedy, when argmax(L_{i-1}) = d_i; sampling, when
   u < p(d_i) / q(d_i) with u uniform (Leviathan et al. 2023, Chen et al. 2023), p and q the
   target's and the draft's distributions under the request's temperature / top-k / top-p
   (`distribution`); a draft that proposes without sampling (prompt lookup, a greedy draft)
   has q one-hot;
5. the cache is cut back to P + 1 + a slots (a drafts accepted; with the shared buffer, a slot
   count), the next logits are L_a, and after a rejection of d_{a+1} the next token is drawn
   from the residual max(0, p - q), normalised.
Greedy output is therefore plain greedy's, token for token (a rejected draft is never the argmax,
so the residual changes nothing), and sampled output has the target's distribution.

Adaptive k (`Policy`): the acceptance rate a of a row is measured (decayed counts of accepted
drafts and of rejections; a run of drafts accepted with rate a yields (1 - a^(k+1)) / (1 - a)
tokens per target forward), and so are the seconds of a one-token forward, of each extra
verified token and of each drafted token. Each step takes the k that gives the most tokens
per second, and k = 0, plain decoding, when no k beats it; after `probe` plain steps it
speculates once to re-measure, and each probe after which plain decoding still wins doubles the
wait for the next (a draft that never pays costs a probe per 16, 32, 64, ... tokens).

Rows: each row keeps its own cache (batch 1). ORT's attention kernel takes several new tokens
over a non-empty past only at batch 1 (layouts with `padded_prefill: false`), and rows accept
different numbers of tokens, so a speculative step runs row by row: speculation buys several
tokens per forward of one row instead of one token per forward of the batch, so it pays at
small batches.

Exactness: step 3 computes logits at k+1 positions in one call, where plain decoding computes
one position per call. Where the engine takes another kernel for one row than for several, the
two differ: ORT's MatMulNBits with int8 activations (kiln's int4 recipe on the CPU) gives logits
about 2% apart (fp32 artifacts: 1e-6, summation order). A probe at the start (`step_difference`:
the logits of a token fed alone and as the first of two) measures it; above `EXACT_RTOL`
speculation is refused, since a near tie could then pick another token than plain decoding,
unless `exact=False` accepts that (greedy output is then the greedy decoding of the several-token
numerics, and sampled output has their distribution).

Refused in one line (`SpeculationError`): artifacts without a KV cache (each step recomputes
the whole sequence), with a static cache or fixed-size chunks (target npu), whose several-token
step is not exact (above), a draft that is not a causal LM or whose tokenizer differs from the
target's.
"""

from __future__ import annotations

import dataclasses
import time
import weakref

import numpy as np

from kiln.runtime.generate import (
    GenerationError,
    Generator,
    Model,
    Row,
    SamplingParams,
    choose,
    distribution,
)

EXACT_RTOL = 1e-4  # step_difference above this: the several-token step is not plain decoding's
MIN_AGREEMENT = 0.6  # a bundled draft's top-1 agreement (manifest draft.agreement) from which kiln run uses it


class SpeculationError(GenerationError):
    """A speculative request this artifact or draft cannot serve exactly."""


@dataclasses.dataclass
class Speculation:
    """How to speculate: `draft` is "lookup" or a draft causal-LM `Model`; at most `draft_tokens`
    tokens are guessed per step; n-grams of `ngram` down to `min_ngram` tokens are looked up;
    `exact=False` speculates also where a several-token step differs from one-token steps."""

    draft: str | Model = "lookup"
    draft_tokens: int = 8
    ngram: int = 3
    min_ngram: int = 2
    adaptive: bool = True
    probe: int = 16
    exact: bool = True

    def __post_init__(self):
        if self.draft_tokens < 1:
            raise SpeculationError(f"draft tokens must be at least 1; got {self.draft_tokens}")
        if not 1 <= self.min_ngram <= self.ngram:
            raise SpeculationError(f"the n-gram sizes must satisfy 1 <= min_ngram <= ngram; got {self.min_ngram}, "
                                   f"{self.ngram}")
        if isinstance(self.draft, str) and self.draft != "lookup":
            raise SpeculationError(f"unknown draft '{self.draft}': give \"lookup\" or a draft model")
        if isinstance(self.draft, Model):
            check_model(self.draft, "the draft")

    def new_draft(self) -> PromptLookup | ModelDraft:
        return PromptLookup(self.ngram, self.min_ngram) if self.draft == "lookup" else ModelDraft(self.draft)


def check_model(model: Model, what: str) -> None:
    """Refuse, in one line, a model that cannot take a multi-token step and forget slots after it."""
    if model.layout is None:
        raise SpeculationError(f"{what} has no KV cache (manifest kv_cache): speculative decoding needs one")
    if model.static or model.chunk:
        raise SpeculationError(f"{what} has a static cache (target npu): speculative decoding needs a growing cache")


_differences: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Model -> its step_difference


def check_exact(model: Model, speculation: Speculation) -> None:
    """Refuse (one line) an exact speculation on a model whose several-token step is not exact."""
    if not speculation.exact:
        return
    if model not in _differences:
        _differences[model] = step_difference(model)
    if _differences[model] > EXACT_RTOL:
        raise SpeculationError(
            f"the artifact computes a step of several tokens differently from one-token steps (logits "
            f"{_differences[model]:.1e} apart, relative; e.g. int4 MatMulNBits with int8 activations), so speculation "
            f"could change its tokens: refused (accept that with exact=False, `kiln run --inexact`)")


def step_difference(model: Model) -> float:
    """How far the logits of a token fed as the first of two are from the same token fed alone,
    relative to the largest logit (after a one-token prefill; the same cache rolled back)."""
    def step(tokens, cache):  # tokens 1, 2, 3 at positions 0, 1, 2
        ids = np.array([tokens], dtype=np.int64)
        return model.forward_all(ids, np.ones((1, tokens[-1]), dtype=np.int64), ids - 1, cache)

    _, cache = step([1], model.empty_cache(1))
    alone, cache = step([2], cache)
    pair, _ = step([2, 3], model.truncate(cache, 1))
    a, b = alone[0, 0].astype(np.float64), pair[0, 0].astype(np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


@dataclasses.dataclass
class Stats:
    """Counters over a generation: `accepted / proposed` is the acceptance rate, `tokens /
    forwards` the tokens per target forward (prefill not counted)."""

    proposed: int = 0
    accepted: int = 0
    forwards: int = 0
    tokens: int = 0

    def as_dict(self) -> dict:
        return {"proposed": self.proposed, "accepted": self.accepted, "target_forwards": self.forwards,
                "tokens": self.tokens, "acceptance_rate": round(self.accepted / self.proposed, 4) if self.proposed else None,
                "tokens_per_forward": round(self.tokens / self.forwards, 4) if self.forwards else None}


class PromptLookup:
    """Drafts by prompt lookup: the tokens that followed the latest earlier occurrence of the
    sequence's last n tokens (n from `ngram` down to `min_ngram`). The index maps each n-gram
    ending before the last token to where it ended; it grows by one position per token."""

    def __init__(self, ngram: int, min_ngram: int):
        self.sizes = range(ngram, min_ngram - 1, -1)
        self.index: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending at positions < indexed are in `index`

    def propose(self, tokens: list[int], k: int, params: SamplingParams, rng) -> tuple[list[int], list]:
        for end in range(self.indexed, len(tokens) - 1):
            for n in self.sizes:
                if end + 1 >= n:
                    self.index[tuple(tokens[end + 1 - n:end + 1])] = end + 1
        self.indexed = max(self.indexed, len(tokens) - 1)
        for n in self.sizes:
            start = self.index.get(tuple(tokens[-n:])) if len(tokens) >= n else None
            if start is not None:
                drafts = tokens[start:start + k]
                return drafts, [None] * len(drafts)
        return [], []


class ModelDraft:
    """Drafts from a smaller causal LM over its own cache (batch 1): it catches up on the tokens
    the target accepted since its last proposal, then decodes k tokens, greedily or by sampling
    with the request's parameters (then q is its distribution)."""

    def __init__(self, model: Model):
        self.model = model
        self.cache = None
        self.fed: list[int] = []  # the tokens in the draft's cache

    def propose(self, tokens: list[int], k: int, params: SamplingParams, rng) -> tuple[list[int], list]:
        m = self.model
        if not m.room(len(tokens) - 1):
            return [], []
        keep = 0  # the cache's tokens that are still the sequence's (one at least is fed)
        while keep < min(len(self.fed), len(tokens) - 1) and self.fed[keep] == tokens[keep]:
            keep += 1
        self.cache = m.empty_cache(1) if self.cache is None else m.truncate(self.cache, keep)
        new = tokens[keep:]
        logits, self.cache = m.forward(np.array([new], dtype=np.int64), np.ones((1, len(tokens)), dtype=np.int64),
                                       np.arange(keep, len(tokens), dtype=np.int64)[None], self.cache)
        self.fed = list(tokens)
        drafts, qs = [], []
        while True:
            if params.temperature <= 0:
                token, q = int(np.argmax(logits[0])), None
            else:
                q = distribution(logits[0], params)
                token = int(rng.choice(len(q), p=q))
            drafts.append(token)
            qs.append(q)
            if len(drafts) == k or not m.room(len(self.fed)):
                return drafts, qs
            n = len(self.fed)
            logits, self.cache = m.forward(np.array([[token]], dtype=np.int64), np.ones((1, n + 1), dtype=np.int64),
                                           np.array([[n]], dtype=np.int64), self.cache)
            self.fed.append(token)


class Policy:
    """The k of each step, from a row's measured acceptance and the measured costs (module docstring)."""

    DECAY = 0.7  # per step: a run of rejections outweighs earlier full acceptances within a few steps

    def __init__(self, max_k: int, adaptive: bool, probe: int):
        self.max_k, self.adaptive, self.probe = max_k, adaptive, probe
        self.accepted, self.rejected = 1.0, 1.0  # decayed counts; the prior: rate 1/2
        self.plain: float | None = None  # seconds of a one-token target forward
        self.extra: float | None = None  # seconds per extra verified token
        self.draft = 0.0  # seconds per drafted token
        self.idle = 0  # plain steps since the last speculative one
        self.wait = probe  # plain steps before the next probe

    def k(self) -> int:
        if not self.adaptive:
            return self.max_k
        if self.plain is None:
            return 0  # the first step measures a plain forward
        if self.extra is None:
            return self.max_k  # the first speculative step measures the rest
        rate = self.accepted / (self.accepted + self.rejected)
        best, best_speed = 0, 1.0 / self.plain
        for k in range(1, self.max_k + 1):
            tokens = (1 - rate ** (k + 1)) / (1 - rate) if rate < 1 else k + 1
            speed = tokens / (self.plain + k * (self.extra + self.draft))
            if speed > best_speed:
                best, best_speed = k, speed
        if best:
            self.wait = self.probe
        elif self.idle >= self.wait:
            self.wait *= 2
            return 1
        return best

    def record(self, proposed: int, accepted: int, forward_s: float, draft_s: float) -> None:
        if proposed == 0:
            self.idle += 1
            self.plain = forward_s if self.plain is None else 0.8 * self.plain + 0.2 * forward_s
            return
        self.idle = 0
        self.accepted = self.DECAY * self.accepted + accepted
        self.rejected = self.DECAY * self.rejected + (accepted < proposed)
        if self.plain is not None:
            extra = max(0.0, forward_s - self.plain) / proposed
            self.extra = extra if self.extra is None else 0.8 * self.extra + 0.2 * extra
        self.draft = 0.8 * self.draft + 0.2 * draft_s / proposed


@dataclasses.dataclass
class _State:
    """A running row's own cache, its next-token logits and the q of a rejected draft (an int:
    one-hot at that token), its draft and its policy."""

    cache: list
    logits: np.ndarray
    draft: PromptLookup | ModelDraft
    policy: Policy
    rejected: int | np.ndarray | None = None


def first_token(state: _State, params: SamplingParams, rng) -> int:
    """The next token from the logits, or from the residual max(0, p - q) after a rejection."""
    if state.rejected is None or params.temperature <= 0:  # greedy: a rejected draft is never the argmax
        return choose(state.logits, params, rng)
    p = distribution(state.logits, params)
    if isinstance(state.rejected, (int, np.integer)):
        p[state.rejected] = 0.0
        residual = p
    else:
        residual = np.maximum(p - state.rejected, 0.0)
    return int(rng.choice(len(residual), p=residual / residual.sum()))


def accept(logits: np.ndarray, drafts: list[int], qs: list, params: SamplingParams, rng) -> tuple[int, object]:
    """How many drafts the target's logits [k+1, V] accept, and the q of the first rejected one."""
    for i, (d, q) in enumerate(zip(drafts, qs)):
        if params.temperature <= 0:
            ok = int(np.argmax(logits[i])) == d
        else:
            p = distribution(logits[i], params)
            if q is not None and len(q) != len(p):
                raise SpeculationError(f"the draft's vocabulary has {len(q)} entries, the target's {len(p)}")
            ok = rng.random() * (1.0 if q is None else q[d]) < p[d]
        if not ok:
            return i, (d if q is None else q)
    return len(drafts), None


class SpeculativeGenerator(Generator):
    """The continuous-batching `Generator`, each row speculating over its own cache; `step()`
    returns one or more (request id, token) per running request."""

    def __init__(self, model: Model, speculation: Speculation, prefill_chunk: int | None = None):
        check_model(model, "the artifact")
        check_exact(model, speculation)
        super().__init__(model, prefill_chunk)
        self.speculation = speculation
        self.states: dict[int, _State] = {}
        self.stats = Stats()

    def _join(self, row: Row, logits: np.ndarray, cache) -> None:
        spec = self.speculation
        self.states[row.rid] = _State(cache, logits[0], spec.new_draft(),
                                      Policy(spec.draft_tokens, spec.adaptive, spec.probe))
        self.rows.append(row)

    def _retain(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        live = {r.rid for r in self.rows}
        self.states = {rid: s for rid, s in self.states.items() if rid in live}

    def _advance(self) -> list[tuple[int, int]]:
        emitted, keep = [], []
        for i, row in enumerate(self.rows):
            try:
                tokens, ended = self._speculate(row, self.states[row.rid])
            except Exception as exc:  # noqa: BLE001 (this row leaves; the others go on)
                self.failed.append((row.rid, exc))
                continue
            emitted += [(row.rid, t) for t in tokens]
            if not ended:
                keep.append(i)
        self._retain(keep)
        return emitted

    def _speculate(self, row: Row, state: _State) -> tuple[list[int], bool]:
        """One step of one row: the tokens it emits and whether the row ended."""
        m, params = self.model, row.params
        x0 = first_token(state, params, row.rng)
        if self._emit(row, x0):
            return [x0], True
        k = min(state.policy.k(), params.max_new_tokens - row.generated)
        while k and not m.room(len(row.tokens) + k):  # the last draft's position stays below the limit
            k -= 1
        started = time.perf_counter()
        drafts, qs = state.draft.propose(row.tokens, k, params, row.rng) if k else ([], [])
        drafted = time.perf_counter()
        past, new = len(row.tokens) - 1, [x0, *drafts]
        logits, state.cache = m.forward_all(np.array([new], dtype=np.int64),
                                            np.ones((1, past + len(new)), dtype=np.int64),
                                            np.arange(past, past + len(new), dtype=np.int64)[None], state.cache)
        done = time.perf_counter()
        accepted, state.rejected = accept(logits[0], drafts, qs, params, row.rng)
        if accepted < len(drafts):
            state.cache = m.truncate(state.cache, past + 1 + accepted)
        state.logits = logits[0, accepted]
        state.policy.record(len(drafts), accepted, done - drafted, drafted - started)
        self.stats.proposed += len(drafts)
        self.stats.accepted += accepted
        self.stats.forwards += 1
        self.stats.tokens += 1 + accepted
        emitted = [x0]
        for token in drafts[:accepted]:
            emitted.append(token)
            if self._emit(row, token):
                return emitted, True
        return emitted, False

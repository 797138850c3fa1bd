"""Quality evaluation of artifacts: `kiln eval DIR [--reference DIR]`.

Causal LMs, over a text (default: the Lee news corpus shipped in the gensim wheel):
- perplexity with a fixed context and stride: windows of `context` tokens start every
  `stride` tokens; each window scores only the tokens the previous one did not (so a
  stride equal to the context gives non-overlapping windows);
- against a reference artifact on the same tokens: mean KL(reference || artifact) of the
  next-token distributions and top-1 agreement, which catch argmax flips that PPL hides.
Encoders, over sentences of the same text: cosine similarity to the reference embeddings
(mean and min) and nearest-neighbour agreement.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np

from kiln.corpus import default_corpus, read_text
from kiln.errors import KilnError
from kiln.runtime import Artifact
from kiln.runtime.generate import Model, log_softmax


@dataclasses.dataclass
class LMReport:
    tokens_scored: int
    windows: int
    perplexity: float
    reference_perplexity: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None

    @property
    def ppl_increase(self) -> float | None:
        if self.reference_perplexity is None:
            return None
        return self.perplexity / self.reference_perplexity - 1


def _windows(n: int, context: int, stride: int, max_windows: int):
    """(begin, end, first scored index within the window) for each window."""
    prev_end, count = 0, 0
    for begin in range(0, n - 1, stride):
        end = min(begin + context, n)
        first = max(prev_end - begin, 1)  # token 0 of the text has nothing to predict it
        if first < end - begin:
            yield begin, end, first
            count += 1
        prev_end = end
        if end == n or count == max_windows:
            return


def evaluate_lm(art: Artifact, text_path: Path | None = None, context: int = 512, stride: int = 512,
                max_windows: int = 10, reference: Artifact | None = None) -> LMReport:
    ids = np.array(art.encode(read_text(text_path or default_corpus())), dtype=np.int64)
    ref = Model(reference.session, reference.manifest) if reference is not None else None
    return score_windows(Model(art.session, art.manifest), ids, context, stride, max_windows, ref)


def score_windows(model, ids: np.ndarray, context: int = 512, stride: int = 512, max_windows: int = 10,
                  reference=None) -> LMReport:
    """The scores of `model` on the token ids; `model` and `reference` are anything with
    `all_logits(ids [1, S]) -> [1, S, V]` (a kiln Model, or a peer's runtime)."""
    if context < 2 or stride < 1 or stride > context:
        raise KilnError("need context >= 2 and 1 <= stride <= context")
    models = [model] if reference is None else [model, reference]
    nll = [0.0, 0.0]
    kl_sum, agree, scored, windows = 0.0, 0, 0, 0
    for begin, end, first in _windows(len(ids), context, stride, max_windows):
        window = ids[None, begin:end]
        targets = window[0, first:]
        logprobs = [log_softmax(m.all_logits(window)[0, first - 1:-1]) for m in models]
        for k, lp in enumerate(logprobs):
            nll[k] -= float(lp[np.arange(len(targets)), targets].sum())
        if reference is not None:
            ref, new = logprobs[1], logprobs[0]
            kl_sum += float(np.sum(np.exp(ref) * (ref - new)))
            agree += int(np.sum(ref.argmax(-1) == new.argmax(-1)))
        scored += len(targets)
        windows += 1
    if not scored:
        raise KilnError("the text is too short to score a single token")
    report = LMReport(scored, windows, math.exp(nll[0] / scored))
    if reference is not None:
        report.reference_perplexity = math.exp(nll[1] / scored)
        report.kl = kl_sum / scored
        report.top1_agreement = agree / scored
    return report


@dataclasses.dataclass
class EncoderReport:
    sentences: int
    cosine_mean: float
    cosine_min: float
    nearest_neighbour_agreement: float


def sentences(text: str, limit: int) -> list[str]:
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+", text) if len(p.strip().split()) >= 4]
    return parts[:limit]


def evaluate_encoder(art: Artifact, reference: Artifact, text_path: Path | None = None, limit: int = 200,
                     batch: int = 32) -> EncoderReport:
    sents = sentences(read_text(text_path or default_corpus()), limit)
    if len(sents) < 2:
        raise KilnError("need at least two sentences of four words or more")
    # float64: an fp16 artifact's (gpu target) cosines would otherwise be computed in fp16
    ours = np.concatenate([art.embed(sents[i:i + batch]) for i in range(0, len(sents), batch)]).astype(np.float64)
    ref = np.concatenate([reference.embed(sents[i:i + batch]) for i in range(0, len(sents), batch)]).astype(np.float64)
    cos = np.sum(ours * ref, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))

    def neighbours(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    agreement = float(np.mean(neighbours(ours) == neighbours(ref)))
    return EncoderReport(len(sents), float(cos.mean()), float(cos.min()), agreement)

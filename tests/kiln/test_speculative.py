"""Speculative decoding (kiln.runtime.speculative) on tiny-llama: greedy tokens equal plain greedy
for every draft kind, alone and in a continuous batch; sampled tokens have the target's
distribution; k adapts; what cannot be done exactly is refused in one line."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import assert_one_line_error, run_kiln
from speculative_prompts import PROMPTS
from tokenizers import Tokenizer

import kiln
from kiln.runtime.generate import SamplingParams, distribution, run_requests
from kiln.runtime.speculative import (
    EXACT_RTOL,
    Policy,
    Speculation,
    SpeculationError,
    SpeculativeGenerator,
    check_exact,
    check_model,
    step_difference,
)


pytestmark = pytest.mark.slow  # a module of compiled targets and drafts, 20 prompts x 128 tokens per draft kind


@pytest.fixture(scope="module")
def arts(tmp_path_factory, prepared):
    """The target (tiny-llama fp32: fused GQA, shared buffer, padded_prefill false) and two
    drafts: tiny-llama int8 (mostly agrees) and tiny-gpt2 (another model: mostly disagrees)."""
    root = tmp_path_factory.mktemp("spec")
    for name, recipe, out in [("tiny-llama", "fp32", "target"), ("tiny-llama", "int8", "int8"), ("tiny-gpt2", "fp32", "gpt2")]:
        prepared(name)
        kiln.compile(name, root / out, recipe=recipe, progress=False)
    return SimpleNamespace(target=kiln.load(root / "target"), int8=kiln.load(root / "int8"),
                           gpt2=kiln.load(root / "gpt2"), root=root)


def forced(draft, k=4, **options):
    """A Speculation that always drafts k tokens (no adaptation), so rejections are exercised."""
    return Speculation(draft, draft_tokens=k, adaptive=False, **options)


def test_greedy_tokens_equal_plain_greedy_for_every_draft(arts):
    target = arts.target
    plain = [target.generate(p, 128).token_ids for p in PROMPTS]
    drafts = {"lookup": forced("lookup", min_ngram=1), "int8": forced(arts.int8._lm()),
              "gpt2": forced(arts.gpt2._lm(), k=3), "adaptive lookup": "lookup", "path": str(arts.root / "int8")}
    for name, spec in drafts.items():
        runs = [target.generate(p, 128, speculative=spec) for p in PROMPTS]
        assert [g.token_ids for g in runs] == plain, name
        proposed = sum(g.speculation["proposed"] for g in runs)
        accepted = sum(g.speculation["accepted"] for g in runs)
        forwards = sum(g.speculation["target_forwards"] for g in runs)
        tokens = sum(len(g.token_ids) for g in runs)
        if name == "int8":  # a draft that mostly agrees: several tokens per target forward
            assert accepted / proposed > 0.5 and tokens / forwards > 2.0, (accepted, proposed, forwards)
        if name == "gpt2":  # one that mostly disagrees: rejections, and still the same tokens
            assert proposed - accepted > 1000
        if name == "lookup":
            assert 0 < accepted < proposed


def test_continuous_batch_of_four_rows_equals_plain(arts):
    target = arts.target
    model = target._lm()
    params = SamplingParams(max_new_tokens=128)
    requests = [(target.encode(p), params) for p in PROMPTS[:8]]
    plain = run_requests(model, requests, arrivals=[0, 0, 0, 0, 3, 5, 9, 40])
    for spec in (forced("lookup", min_ngram=1), forced(arts.int8._lm())):
        batcher = SpeculativeGenerator(model, spec)
        # four rows at once, then requests that join while others run (chunked prefill included)
        assert run_requests(model, requests, arrivals=[0, 0, 0, 0, 3, 5, 9, 40], batcher=batcher) == plain
        chunked = SpeculativeGenerator(model, spec, prefill_chunk=4)
        assert run_requests(model, requests[:4], batcher=chunked) == plain[:4]
    assert ([g.token_ids for g in target.generate_continuous(PROMPTS[:4], 64, speculative="lookup")]
            == [g.token_ids for g in target.generate_continuous(PROMPTS[:4], 64)])


def test_stop_tokens_and_the_last_position_end_as_plain_decoding(arts):
    target = arts.target
    prompt = target.encode(PROMPTS[0])
    free = target.generate(prompt, 64).token_ids
    for stop in free[5:12]:  # a stop token inside an accepted run of drafts cuts it
        plain = target.generate(prompt, 64, stop_token_ids=(stop,))
        spec = target.generate(prompt, 64, stop_token_ids=(stop,), speculative=forced(arts.int8._lm(), k=6))
        assert spec.token_ids == plain.token_ids and spec.stop_reason == plain.stop_reason == "stop"
    limit = target.max_positions
    long = (prompt * limit)[: limit - 20]  # 20 positions left: the drafts must not pass the last one
    plain = target.generate(long, 64)
    for spec in (forced("lookup", k=8, min_ngram=1), forced(arts.int8._lm(), k=8)):
        got = target.generate(long, 64, speculative=spec)
        assert got.token_ids == plain.token_ids and len(got.token_ids) == 20 and got.stop_reason == "length"


def test_a_copying_cache_rolls_back_like_the_shared_buffer(arts, tmp_path):
    """Without the shared buffer the cache is cut by slicing; tokens are the same."""
    art = kiln.load(arts.root / "target")
    art._lm().shared = False
    for p in PROMPTS[:5]:
        assert (art.generate(p, 64, speculative=forced(arts.int8._lm())).token_ids
                == arts.target.generate(p, 64).token_ids)


def _second_token_histogram(target, prompt, spec, runs, vocab):
    counts = np.zeros(vocab)
    for seed in range(runs):
        out = target.generate(prompt, 2, seed=seed, speculative=spec, temperature=1.0, top_k=6).token_ids
        counts[out[1]] += 1
    return counts / runs


class FixedDraft:
    """A draft model stand-in whose q is a fixed distribution, unrelated to the target's."""

    def __init__(self, q):
        self.q = q

    def propose(self, tokens, k, params, rng):
        drafts = [int(rng.choice(len(self.q), p=self.q)) for _ in range(k)]
        return drafts, [self.q] * k


def test_sampled_tokens_have_the_targets_distribution(arts):
    """The second token's distribution, exactly: sum over the first token t of p(t) p(. | t), from
    the target's own logits; the sampled speculative runs must be within sampling noise of it
    (total variation), for one-hot drafts (lookup) and for drafts with a distribution q."""
    target = arts.target
    model = target._lm()
    params = SamplingParams(temperature=1.0, top_k=6)
    prompt = target.encode("abab abab ab")
    first = distribution(model.all_logits(np.array([prompt]))[0, -1], params)
    exact = np.zeros_like(first)
    for t in np.nonzero(first)[0]:
        exact += first[t] * distribution(model.all_logits(np.array([prompt + [int(t)]]))[0, -1], params)
    # q: mass on tokens the target also likes and on tokens it never samples
    q = np.zeros_like(first)
    q[np.argsort(-exact)[:3]] = 0.3
    q[0] = 0.1
    runs = 3000
    tolerance = 0.5 * np.sqrt(np.count_nonzero(exact) / runs)  # well above sampling noise, far below a wrong rule
    for spec in (forced("lookup", k=2, min_ngram=1), forced(arts.int8._lm(), k=2)):
        got = _second_token_histogram(target, prompt, spec, runs, len(exact))
        assert 0.5 * np.abs(got - exact).sum() < tolerance
    gen = SpeculativeGenerator(model, forced("lookup", k=2))
    gen.speculation.new_draft = lambda: FixedDraft(q)
    counts = np.zeros_like(exact)
    for seed in range(runs):
        out = run_requests(model, [(prompt, SamplingParams(max_new_tokens=2, temperature=1.0, top_k=6, seed=seed))],
                           batcher=gen)[0]
        counts[out[1]] += 1
    assert 0.5 * np.abs(counts / runs - exact).sum() < tolerance
    # the same check catches a wrong rule: accepting every draft gives q's distribution
    assert 0.5 * np.abs(q - exact).sum() > 3 * tolerance


def test_k_adapts_to_the_acceptance_rate_and_backs_off():
    policy = Policy(max_k=8, adaptive=True, probe=4)
    assert policy.k() == 0  # first a plain step, to measure it
    policy.record(0, 0, forward_s=0.010, draft_s=0.0)
    assert policy.k() == 8  # then a full guess, to measure the extra tokens
    for _ in range(20):  # everything accepted; an extra verified token costs 1/4 of a step
        policy.record(8, 8, forward_s=0.010 + 8 * 0.0025, draft_s=0.0)
    assert policy.k() == 8
    for _ in range(20):  # nothing accepted: plain decoding pays more
        policy.record(8, 0, forward_s=0.030, draft_s=0.0)
    assert policy.k() == 0
    for wait in (4, 8, 16):  # a probe after `probe` plain steps, then after twice as many each time
        for _ in range(wait):
            assert policy.k() == 0
            policy.record(0, 0, forward_s=0.010, draft_s=0.0)
        assert policy.k() == 1
        policy.record(1, 0, forward_s=0.0125, draft_s=0.0)
    for _ in range(20):  # acceptance returns: speculation again, and the next probe after `probe` steps
        policy.record(8, 8, forward_s=0.010 + 8 * 0.0025, draft_s=0.0)
    assert policy.k() == 8 and policy.wait == 4
    fixed = Policy(max_k=5, adaptive=False, probe=4)
    assert fixed.k() == 5


def test_refusals_are_one_line(arts):
    with pytest.raises(SpeculationError, match="at least 1"):
        Speculation("lookup", draft_tokens=0)
    with pytest.raises(SpeculationError, match="unknown draft 'medusa'"):
        Speculation("medusa")
    with pytest.raises(SpeculationError, match="min_ngram"):
        Speculation("lookup", ngram=2, min_ngram=3)
    with pytest.raises(SpeculationError, match="no KV cache"):
        check_model(SimpleNamespace(layout=None, static=False, chunk=None), "the artifact")
    with pytest.raises(SpeculationError, match="static cache"):
        check_model(SimpleNamespace(layout=object(), static=True, chunk=None), "the artifact")
    other = kiln.load(arts.root / "int8")
    other.tokenizer = Tokenizer.from_str(other.tokenizer.to_str())
    other.tokenizer.add_tokens(["<extra>"])
    with pytest.raises(SpeculationError, match="does not have this artifact's tokenizer"):
        arts.target.generate("hi", 4, speculative=other)


def test_cli_run_speculative_prints_the_same_tokens_and_its_stats(arts):
    target = str(arts.root / "target")
    plain = json.loads(run_kiln("run", target, "-p", PROMPTS[2], "-n", "48", "--json").stdout)
    for draft in ("lookup", str(arts.root / "int8")):
        proc = run_kiln("run", target, "-p", PROMPTS[2], "-n", "48", "--json", "--speculative", draft, "--draft-tokens", "3")
        got = json.loads(proc.stdout)
        assert got["token_ids"] == plain["token_ids"]
        stats = got["speculation"]
        assert stats["tokens"] == 48 or stats["tokens"] == 47  # the last token may end the row before a forward
        assert stats["accepted"] <= stats["proposed"] and stats["target_forwards"] <= 48
    proc = run_kiln("run", target, "-p", PROMPTS[2], "-n", "48", "--speculative", "lookup")
    assert proc.returncode == 0 and "drafts accepted" in proc.stderr and "tokens per target forward" in proc.stderr


def test_cli_speculative_errors_are_one_line(arts, tmp_path):
    target = str(arts.root / "target")
    assert_one_line_error(run_kiln("run", target, "-p", "hi", "--draft-tokens", "3"), "--draft-tokens needs --speculative")
    assert_one_line_error(run_kiln("run", target, "-p", "hi", "--speculative", str(tmp_path / "nothere")),
                          "no such artifact directory")
    assert_one_line_error(run_kiln("run", target, "-p", "hi", "--speculative", "lookup", "--num-beams", "2"),
                          "--speculative and --num-beams cannot be combined")
    kiln.compile("tiny-bert", tmp_path / "bert", progress=False)
    assert_one_line_error(run_kiln("run", target, "-p", "hi", "--speculative", str(tmp_path / "bert")),
                          "is a embedding artifact, not a causal LM")
    assert_one_line_error(run_kiln("run", str(tmp_path / "bert"), "--text", "hi", "--speculative", "lookup"),
                          "--speculative is for an LLM artifact")


class SkewedSteps:
    """A model stand-in whose several-token steps add `skew` to every logit (as int4 MatMulNBits
    with int8 activations does, by another kernel for one row than for several)."""

    def __init__(self, skew):
        self.skew = skew

    def empty_cache(self, batch):
        return []

    def truncate(self, cache, length):
        return cache

    def forward_all(self, ids, mask, positions, cache):
        logits = np.tile(np.linspace(-10, 10, 32), (1, ids.shape[1], 1))
        return logits + (self.skew if ids.shape[1] > 1 else 0.0), cache

    def forward(self, ids, mask, positions, cache):
        logits, cache = self.forward_all(ids, mask, positions, cache)
        return logits[:, -1], cache


def test_a_several_token_step_that_is_not_exact_is_refused_unless_allowed(arts):
    assert step_difference(arts.target._lm()) < EXACT_RTOL  # fp32: summation order only
    check_exact(SkewedSteps(1e-6), Speculation("lookup"))
    with pytest.raises(SpeculationError, match=r"several tokens differently .* \(logits 1\.0e-02 apart"):
        check_exact(SkewedSteps(0.1), Speculation("lookup"))
    check_exact(SkewedSteps(0.1), Speculation("lookup", exact=False))
    proc = run_kiln("run", str(arts.root / "target"), "-p", "hi", "--inexact")
    assert_one_line_error(proc, "--inexact needs --speculative")
    plain = arts.target.generate(PROMPTS[0], 32).token_ids
    assert arts.target.generate(PROMPTS[0], 32, speculative=Speculation("lookup", exact=False)).token_ids == plain

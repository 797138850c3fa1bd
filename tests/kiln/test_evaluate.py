import math

import pytest
import torch

import kiln
from kiln.errors import KilnError
from kiln.evaluate import _windows, evaluate_encoder, evaluate_lm
from kiln.models import get_source

TEXT = ("The river rose through the night and by morning the town was cut off. Volunteers filled sandbags "
        "while the council met to decide what to do. Farmers moved their cattle to higher ground. ") * 6


@pytest.fixture(scope="module")
def llama(compiled):
    return kiln.load(compiled("tiny-llama", "fp32"))


def test_windows_score_every_token_once():
    for n, ctx, stride in [(100, 16, 16), (100, 16, 8), (17, 16, 16), (5, 16, 4)]:
        scored, starts = [], range(0, n, stride)
        for begin, end, first in _windows(n, ctx, stride, max_windows=1000):
            assert end - begin <= ctx
            scored += list(range(begin + first, end))
        # overlapping windows give every token context; non-overlapping ones cannot score
        # a window's first token (nothing before it is in the window)
        expected = [t for t in range(1, n) if stride < ctx or t not in starts]
        assert scored == expected


def test_perplexity_matches_pytorch(llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    report = evaluate_lm(llama, text, context=64, stride=64, max_windows=3)
    ids = torch.tensor(llama.encode(TEXT))
    model = get_source("tiny-llama").load().reference
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            window = ids[w * 64:(w + 1) * 64][None]
            logits = model(window).logits[0, :-1]
            targets = window[0, 1:]
            nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
    # non-overlapping windows: each scores its positions 1..63 (nothing precedes its first token)
    assert report.tokens_scored == count
    assert report.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_against_itself_kl_is_zero(llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    report = evaluate_lm(llama, text, context=32, stride=16, max_windows=4, reference=llama)
    assert report.kl == pytest.approx(0, abs=1e-9)
    assert report.top1_agreement == 1.0 and report.ppl_increase == pytest.approx(0, abs=1e-9)


@pytest.mark.slow  # the gensim wheel
def test_cli_evaluates_on_a_named_corpus(llama):
    import json

    from conftest import run_kiln
    from kiln.corpus import newsgroups_corpus

    proc = run_kiln("eval", str(llama.path), "--corpus", "newsgroups", "--context", "64", "--stride", "64", "--windows", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    expected = evaluate_lm(llama, newsgroups_corpus(), context=64, stride=64, max_windows=2)
    assert json.loads(proc.stdout)["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)


def test_bad_inputs(llama, tmp_path):
    with pytest.raises(KilnError, match="no such text file"):
        evaluate_lm(llama, tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  ")
    with pytest.raises(KilnError, match="empty"):
        evaluate_lm(llama, tmp_path / "empty.txt")
    with pytest.raises(KilnError, match="stride"):
        evaluate_lm(llama, None, context=8, stride=16)


def test_encoder_against_itself(tmp_path, prepared):
    prepared("tiny-bert")
    bert = kiln.load(kiln.compile("tiny-bert", tmp_path / "b", progress=False).path)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    report = evaluate_encoder(bert, bert, text, limit=12)
    assert report.sentences == 12
    assert report.cosine_min == pytest.approx(1.0, abs=1e-6)
    assert report.nearest_neighbour_agreement == 1.0

"""The runtime side of task `sequence-classification` (classifiers, cross-encoder rerankers),
driven from the manifest contract alone (docs/manifest.md, `classification`).

The artifact is made by hand, independently of the compiler's task inference: a tiny random
BertForSequenceClassification compiled as a module (`kiln.compile(module, example_inputs=...)`),
its output renamed `logits`, and the manifest given the task, the labels and a tokenizer with
a pair template and a pad id. Scores are checked against the PyTorch model's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from artifact_edits import copy_artifact, edit_manifest, rename_values
from conftest import run_kiln

import kiln
from kiln.errors import KilnError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LABELS = ["negative", "neutral", "positive"]
MAX_LEN = 40
TEXTS = ["what is the capital of france?", "hi", "a much longer query about the weather in the mountains " * 3]
PAIRS = ["Paris is the capital of France.", "hello there", "It snows."]


def _tokenizer():
    from tokenizers import processors

    from kiln.models import tiny

    tok = tiny.byte_tokenizer(bert_style=True)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tiny.CLS), ("[SEP]", tiny.SEP)])
    tok.enable_padding(pad_id=tiny.PAD, pad_token="[PAD]")  # the runtime pads with this id
    return tok


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """(artifact dir, the PyTorch model)."""
    from kiln.models import tiny

    config = transformers.BertConfig(vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=160, num_labels=len(LABELS),
                                     pad_token_id=tiny.PAD)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    example = {"input_ids": torch.randint(0, 256, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long),
               "token_type_ids": torch.zeros(2, 7, dtype=torch.long)}
    dynamic = {k: {0: "batch", 1: "sequence"} for k in example}
    out = tmp_path_factory.mktemp("cls") / "a"
    result = kiln.compile(_Logits(model), out, example_inputs=example, dynamic_shapes=dynamic, recipe="fp32",
                          progress=False)
    (output,) = result.manifest["io"]["outputs"]
    if output["name"] != "logits":
        rename_values(out, {output["name"]: "logits"})
    (out / "tokenizer.json").write_text(_tokenizer().to_str())
    source = {**result.manifest.get("source", {}), "vocab_size": tiny.VOCAB}
    edit_manifest(out, task="sequence-classification", tokenizer="tokenizer.json", source=source,
                  classification={"labels": LABELS, "problem_type": "single_label_classification",
                                  "max_sequence_length": MAX_LEN})
    return out, model


def _torch_logits(model, feeds: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()


def test_pairs_are_scored_as_the_pytorch_model_scores_them(classifier):
    path, model = classifier
    art = kiln.load(path)
    results = art.classify(TEXTS, PAIRS)
    feeds = art.tokenize_batch(TEXTS, PAIRS, MAX_LEN, art.pad_id)
    # the pair encoding is the tokenizer's own ([CLS] a [SEP] b [SEP], type ids 0 then 1), truncated
    tok = _tokenizer()
    tok.no_padding()
    tok.enable_truncation(MAX_LEN)
    for row, (a, b) in enumerate(zip(TEXTS, PAIRS)):
        enc = tok.encode(a, b)
        n = len(enc.ids)
        assert feeds["input_ids"][row, :n].tolist() == enc.ids and n <= MAX_LEN
        assert feeds["token_type_ids"][row, :n].tolist() == enc.type_ids and 1 in enc.type_ids
        assert (feeds["input_ids"][row, n:] == art.pad_id).all() and feeds["attention_mask"][row].sum() == n
    assert feeds["input_ids"].shape[1] == MAX_LEN  # the long pair was truncated
    want = _torch_logits(model, feeds)
    got = np.stack([r.logits for r in results])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    for r, w in zip(results, want):
        e = np.exp(w - w.max())
        np.testing.assert_allclose(r.scores, e / e.sum(), atol=1e-5)
        assert r.labels == LABELS and r.label == LABELS[int(np.argmax(w))]
    # a row alone (no padding in its batch) scores the same
    alone = art.classify(TEXTS[1], PAIRS[1])[0]
    np.testing.assert_allclose(alone.logits, results[1].logits, atol=1e-5)


def test_single_texts_are_scored_as_the_pytorch_model_scores_them(classifier):
    path, model = classifier
    art = kiln.load(path)
    feeds = art.tokenize_batch(TEXTS, None, MAX_LEN, art.pad_id)
    assert not feeds["token_type_ids"].any()
    np.testing.assert_allclose(np.stack([r.logits for r in art.classify(TEXTS)]), _torch_logits(model, feeds),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_problem_type_chooses_the_scores(classifier, tmp_path, problem_type):
    path, _ = classifier
    other = copy_artifact(path, tmp_path / problem_type)
    manifest = json.loads((other / "kiln.json").read_text())
    edit_manifest(other, classification={**manifest["classification"], "problem_type": problem_type})
    (result,) = kiln.load(other).classify(TEXTS[0], PAIRS[0])
    want = 1 / (1 + np.exp(-result.logits.astype(np.float64))) if problem_type == "multi_label_classification" \
        else result.logits
    np.testing.assert_allclose(result.scores, want, atol=1e-6)


def test_classifier_misuse_is_refused(classifier):
    art = kiln.load(classifier[0])
    with pytest.raises(KilnError, match="2 texts but 1 pairs"):
        art.classify(TEXTS[:2], PAIRS[:1])
    with pytest.raises(KilnError, match="does not generate text"):
        art.generate("hi", 2)
    with pytest.raises(KilnError, match="does not produce embeddings"):
        art.embed(["hi"])


def test_kiln_run_prints_one_line_per_label(classifier):
    path, _ = classifier
    proc = run_kiln("run", str(path), "--text", TEXTS[0], "--pair", PAIRS[0])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 + len(LABELS)
    for label, line in zip(LABELS, lines[1:]):
        assert line.strip().startswith(f"{label}: softmax ")
    payload = json.loads(run_kiln("run", str(path), "--text", TEXTS[0], "--pair", PAIRS[0], "--json").stdout)
    (result,) = payload["results"]
    assert list(result["scores"]) == LABELS and abs(sum(result["scores"].values()) - 1) < 1e-5
    assert kiln.load(path).classify(TEXTS[0], PAIRS[0])[0].label == result["label"]


def test_kiln_eval_refuses_and_kiln_bench_runs_a_classifier(classifier):
    path, _ = classifier
    proc = run_kiln("eval", str(path), "--text", __file__)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "a 'sequence-classification' artifact has no evaluation" in lines[0]
    proc = run_kiln("bench", str(path), "--repeats", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["latency_b1_s16_ms"] > 0

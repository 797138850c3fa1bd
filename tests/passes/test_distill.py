"""distill: trains the weights a structural pass left against the source model's outputs."""

import numpy as np
import onnx_ir as ir
import pytest

from kiln.errors import KilnError
from kiln.passes import KilnPass, create_pass, run_pipeline
from kiln.passes.numerics import run_ort


def _text_feeds(feeds, vocab, count, seed, tokens=32):
    """Feeds over a small alphabet (24 tokens), so that held-out feeds are made of what training saw."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = rng.integers(0, min(vocab, 24), size=tokens)
        out.append({k: (ids[None] if k == "input_ids" else np.ones((1, tokens), dtype=v.dtype) if "mask" in k
                        else np.zeros((1, tokens), dtype=v.dtype)) for k, v in feeds.items()})
    return out


def _kl(source, model, feeds):
    """Mean next-token KL(source ‖ model) over feeds."""
    total = []
    for f in feeds:
        p, q = (run_ort(m, f)["logits"].astype(np.float64) for m in (source, model))
        lp = p - np.log(np.exp(p - p.max(-1, keepdims=True)).sum(-1, keepdims=True)) - p.max(-1, keepdims=True)
        lq = q - np.log(np.exp(q - q.max(-1, keepdims=True)).sum(-1, keepdims=True)) - q.max(-1, keepdims=True)
        total.append(float((np.exp(lp) * (lp - lq)).sum(-1).mean()))
    return float(np.mean(total))


class _Perturb(KilnPass):
    """A stand-in for a lossy pass: adds a rank-2 error to every MatMul weight."""

    exact, metric, budget = False, "kl", 10.0

    def call(self, model):
        rng = np.random.default_rng(0)
        for v in model.graph.initializers.values():
            w = v.const_value.numpy() if v.const_value is not None else None
            if w is None or w.ndim != 2 or w.dtype != np.float32 or not any(u.node.op_type == "MatMul" for u in v.uses()):
                continue
            error = rng.standard_normal((w.shape[0], 2)) @ rng.standard_normal((2, w.shape[1]))
            v.const_value = ir.tensor((w + 0.5 * w.std() * error / 2).astype(np.float32), name=v.name)
        return self.result(model, modified=True)


@pytest.mark.slow  # 100 training steps each
@pytest.mark.parametrize("rank", [0, 4])
def test_distillation_heals_a_lossy_pass_on_inputs_it_did_not_see(cleaned, rank):
    meta, model, feeds, _ = cleaned("tiny-llama")
    source = _copy(model)
    vocab = meta.get("vocab_size", 256)
    calib, unseen = _text_feeds(feeds, vocab, 24, 0), _text_feeds(feeds, vocab, 6, 1)
    damaged = run_pipeline(_copy(model), [_Perturb()], feeds, progress=False).model
    run = run_pipeline(model, [_Perturb(), create_pass("distill", {"steps": 100, "rank": rank, "lr": 1e-2 if rank else 2e-3})],
                       feeds, calibration=calib, progress=False)
    record = run.records[-1]
    assert record["name"] == "distill" and record["modified"], record
    stats = record["stats"]
    assert stats["loss"] == "kl" and stats["feeds_held_out"] == 3 and stats["steps"] == 100
    assert stats["loss_heldout_after"] < 0.7 * stats["loss_heldout_before"], stats
    curve = stats["loss_curve"]  # [step, training loss, held-out loss]: from the start, 8 checks and the end
    assert [c[0] for c in curve][::len(curve) - 1] == [0, 100] and len(curve) >= 9
    assert any("LM head" in r for r in record["rejected"])  # the head and the table stay as they were
    before, after = _kl(source, damaged, unseen), _kl(source, run.model, unseen)
    assert after < 0.7 * before, (before, after)
    assert record["delta_total"]["kl"] < run.records[0]["delta_total"]["kl"]  # sample inputs: other tokens


def _copy(model):
    return ir.from_proto(ir.to_proto(model))


def test_an_encoder_learns_its_source_embeddings_by_cosine(cleaned):
    meta, model, feeds, _ = cleaned("tiny-bert")
    calib = _text_feeds(feeds, meta.get("vocab_size", 256), 16, 0)
    perturb = _Perturb()
    perturb.metric = "max_rel"
    run = run_pipeline(model, [perturb, create_pass("distill", {"steps": 40, "lr": 1e-3, "metric": "max_rel",
                                                                "budget": 10.0})],
                       feeds, calibration=calib, progress=False)
    stats = run.records[-1]["stats"]
    assert stats["loss"] == "cosine"
    assert stats["loss_heldout_after"] < 0.8 * stats["loss_heldout_before"], stats
    assert run.records[-1]["delta_total"]["max_rel"] < run.records[-2]["delta_total"]["max_rel"]


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_other_losses_on_logits_compare_log_probabilities(cleaned, loss):
    """The teacher of a causal LM gives log-probabilities: mse and cosine compare the model's own
    log-probabilities with them (not its raw logits), so training still heals."""
    meta, model, feeds, _ = cleaned("tiny-llama")
    calib = _text_feeds(feeds, meta.get("vocab_size", 256), 16, 0)
    run = run_pipeline(model, [_Perturb(), create_pass("distill", {"steps": 30, "rank": 4, "lr": 1e-2, "loss": loss})],
                       feeds, calibration=calib, progress=False)
    stats = run.records[-1]["stats"]
    assert stats["loss"] == loss and run.records[-1]["modified"]
    assert stats["loss_heldout_after"] < 0.8 * stats["loss_heldout_before"], stats
    assert run.records[-1]["delta_total"]["kl"] < run.records[0]["delta_total"]["kl"]


def test_nothing_to_gain_changes_nothing(cleaned):
    """Distilling the source into itself: the held-out loss is already 0, the weights stay."""
    meta, model, feeds, _ = cleaned("tiny-llama")
    calib = _text_feeds(feeds, meta.get("vocab_size", 256), 8, 0)
    run = run_pipeline(model, [create_pass("distill", {"steps": 4})], feeds, calibration=calib, progress=False)
    record = run.records[-1]
    assert not record["modified"] and "did not lower the held-out loss" in record["warnings"][0]


def test_errors(cleaned):
    meta, model, feeds, _ = cleaned("tiny-bert")
    calib = _text_feeds(feeds, meta.get("vocab_size", 256), 8, 0)
    with pytest.raises(KilnError, match="loss='kl' needs a 'logits' output"):
        run_pipeline(model, [create_pass("distill", {"steps": 2, "loss": "kl"})], feeds, calibration=calib, progress=False)
    with pytest.raises(KilnError, match="distill needs calibration data"):
        run_pipeline(model, [create_pass("distill", {"steps": 2})], feeds, progress=False)
    p = create_pass("distill", {"steps": 2})
    p.calibration = calib
    with pytest.raises(KilnError, match="needs the source model's outputs"):
        p(model)
    with pytest.raises(KilnError, match="loss must be one of"):
        create_pass("distill", {"loss": "l1"})


@pytest.mark.slow  # 300 steps and 256 windows of calibration: about a minute even on tiny-llama
def test_a_distill_preset_compiles_by_the_cli_and_records_its_training(tmp_path):
    import json

    from conftest import run_kiln

    out = tmp_path / "out"
    proc = run_kiln("compile", "tiny-llama", "-r", "prune-mlp-distill", "-o", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    record = next(r for r in json.loads((out / "kiln.json").read_text())["passes"] if r["name"] == "distill")
    stats = record["stats"]
    assert stats["steps"] == 300 and stats["feeds_train"] + stats["feeds_held_out"] > 8
    assert record["modified"] == (stats["loss_heldout_after"] < stats["loss_heldout_before"])
    assert [c[0] for c in stats["loss_curve"]][::len(stats["loss_curve"]) - 1] == [0, 300]

import numpy as np
import onnx_ir as ir
import pytest

from kiln.ir import load_model, summary, verify
from kiln.models import sample_inputs
from kiln.passes import create_pass, run_pipeline
from kiln.passes.lower_matmul_nbits import LowerMatMulNBitsPass
from kiln.passes.numerics import compare, run_ort
from kiln.passes.calibration import CalibrationError
from kiln.passes.quantization import compact_step, dequantize, gptq, output_error, rtn
from kiln.passes.quantize_weights import QuantizeWeightsPass


@pytest.mark.parametrize("bits, block, symmetric", [(4, 32, True), (4, 64, False), (8, 0, True), (8, 32, False)])
def test_rtn_beats_plain_max_abs_rounding(bits, block, symmetric):
    w = np.random.default_rng(0).standard_normal((100, 24)).astype(np.float32)  # K not a multiple of 32
    q, scale, zero = rtn(w, bits, block, symmetric)
    assert (zero is None) == symmetric
    err = np.square(dequantize(q, scale, zero, block) - w).sum()
    # the grid without the range search: max |w| per block on the largest level
    bs = block or 100
    hi = 2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1
    naive = 0.0
    for start in range(0, 100, bs):
        g = w[start:start + bs]
        if symmetric:
            s = np.abs(g).max(0) / hi
            naive += np.square(np.clip(np.round(g / s), -hi - 1, hi) * s - g).sum()
        else:
            lo_, hi_ = np.minimum(g.min(0), 0), np.maximum(g.max(0), 0)
            s = (hi_ - lo_) / hi
            z = np.round(-lo_ / s)
            naive += np.square((np.clip(np.round(g / s) + z, 0, hi) - z) * s - g).sum()
    assert err <= naive * (1 + 1e-6)
    if bits == 4:  # the search finds a better clipping
        assert err < naive
    assert np.all(np.abs(dequantize(q, scale, zero, block) - w) <= np.repeat(scale, bs, 0)[:100] * 2 ** bits / 2)


def _llama(prepared):
    p = prepared("tiny-llama")
    model = load_model(p.path)
    feeds = sample_inputs(p.meta, summary(model).inputs)
    run = run_pipeline(model, [create_pass(n) for n in ["fold-constants", "simplify", "eliminate-common-subexpressions",
                                                         "fold-constants", "insert-kv-cache"]], feeds, progress=False)
    return run.model, run.feeds


def test_quantizes_every_projection_the_head_and_the_embedding(prepared):
    model, feeds = _llama(prepared)
    result = QuantizeWeightsPass(bits=4, block_size=16, min_elements=0)(model)
    verify(model)
    # 2 layers x (q, k, v, o, gate, up, down) + the LM head (folded to its own [H, V]) + the table
    assert result.stats["weights_quantized"] == 16
    assert result.stats["matmuls"] == 15 and result.stats["embeddings"] == 1
    assert result.stats["weight_mb_after"] < result.stats["weight_mb_before"] / 5
    assert result.stats["bits_per_weight"] == 4 + 32 / 16
    assert model.opset_imports[""] == 21
    assert summary(model).ops["DequantizeLinear"] == 16
    assert not QuantizeWeightsPass(bits=4, block_size=16, min_elements=0)(model).modified  # idempotent


def _tied(vocab=96, hidden=64) -> ir.Model:
    """logits = Gather(E, ids) @ Transpose(E): one table, read by the embedding and the head."""
    ids = ir.val("ids", ir.DataType.INT64, ir.Shape(["B", "S"]))
    table = ir.val("E", const_value=ir.tensor(np.random.default_rng(4).standard_normal((vocab, hidden)).astype(np.float32)))
    gather = ir.node("Gather", [table, ids], num_outputs=1)
    transpose = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, num_outputs=1)
    head = ir.node("MatMul", [gather.outputs[0], transpose.outputs[0]], num_outputs=1)
    head.outputs[0].name, head.outputs[0].dtype = "logits", ir.DataType.FLOAT
    head.outputs[0].shape = ir.Shape(["B", "S", vocab])
    graph = ir.Graph([ids], [head.outputs[0]], nodes=[gather, transpose, head], initializers=[table],
                     opset_imports={"": 21}, name="tied")
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, True)])
def test_a_tied_table_is_quantized_once_and_stored_once(bits, symmetric):
    model = _tied()
    result = QuantizeWeightsPass(bits=bits, block_size=32, symmetric=symmetric, min_elements=0)(model)
    assert result.stats["weights_quantized"] == 1 and result.stats["embeddings"] == 1
    assert summary(model).ops["DequantizeLinear"] == 1
    feeds = {"ids": np.array([[0, 5, 95], [7, 7, 1]], dtype=np.int64)}
    before = run_ort(model, feeds)
    lowered = LowerMatMulNBitsPass()(model)
    assert lowered.stats["lowered"] == 1 and lowered.stats["tables_lowered"] == 1
    assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-5
    gbq = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    mm = next(n for n in model.graph if n.op_type == "MatMulNBits")
    assert gbq.inputs[0] is mm.inputs[1]  # one packed table for both readers


@pytest.mark.parametrize("symmetric", [True, False])
def test_compact_scales_are_uint8_multiples_of_a_channel_step_and_cost_little(symmetric):
    w = np.random.default_rng(3).standard_normal((256, 40)).astype(np.float32)
    w[:, 3] *= np.repeat(np.geomspace(0.05, 1.0, 8), 32)[::-1]  # blocks of one column spanning 20x in range
    gram = (lambda x: x.T @ x)(np.random.default_rng(4).standard_normal((512, 256)))
    step = compact_step(w, 4, 32, symmetric)
    for method in ("rtn", "gptq"):
        if method == "rtn":
            exact, compact = rtn(w, 4, 32, symmetric), rtn(w, 4, 32, symmetric, scale_step=step)
        else:
            exact, compact = (gptq(w, gram, 4, 32, symmetric, act_order=True, scale_step=s) for s in (None, step))
        levels = compact[1] / step
        assert np.all(np.abs(levels - np.round(levels)) < 1e-3)
        assert np.round(levels).min() >= 1 and np.round(levels).max() <= 255
        # the stored value is the float32 product, as DequantizeLinear(levels, step) computes it
        assert np.array_equal(compact[1], (np.round(levels).astype(np.float32) * step).astype(np.float32))
        errors = [output_error(w, dequantize(*r, 32), gram) for r in (exact, compact)]
        assert errors[1] < errors[0] * 1.03  # about 4x smaller scales for at most 3% more error


def test_lm_head_and_embedding_can_stay_float(prepared):
    model, _ = _llama(prepared)
    result = QuantizeWeightsPass(include_lm_head=False, include_embedding=False, block_size=16, min_elements=0)(model)
    assert result.stats["weights_quantized"] == 14 and result.stats["embeddings"] == 0
    assert any("LM head left in float" in r for r in result.rejected)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(act_order):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 64)) @ rng.standard_normal((64, 64)) * 0.1 + rng.standard_normal((2048, 1)) * 3
    gram = x.T @ x
    w = rng.standard_normal((64, 48)).astype(np.float32)
    for symmetric in (True, False):
        e_rtn = output_error(w, dequantize(*rtn(w, 4, 16, symmetric), 16), gram)
        q, scale, zero = gptq(w, gram, 4, 16, symmetric, act_order=act_order)
        assert q.shape == w.shape and scale.shape == (4, 48)
        assert output_error(w, dequantize(q, scale, zero, 16), gram) < e_rtn / 2


def test_gptq_needs_calibration(prepared):
    model, _ = _llama(prepared)
    with pytest.raises(CalibrationError, match="calibration"):
        QuantizeWeightsPass(method="gptq", block_size=16, min_elements=0)(model)


def _calibration(model, feeds, n=2):
    rng = np.random.default_rng(3)
    return [{**feeds, "input_ids": rng.integers(0, 200, size=feeds["input_ids"].shape)} for _ in range(n)]


@pytest.mark.slow  # calibrated training / GPTQ over a model
def test_gptq_and_mixed_precision_in_the_pipeline(prepared):
    model, feeds = _llama(prepared)
    fp = run_ort(model, feeds)
    p = QuantizeWeightsPass(method="gptq", block_size=16, min_elements=0, max_bits_per_weight=7.0, budget=10)
    p.calibration = _calibration(model, feeds)
    result = p(model)
    verify(model)
    # 4 bits + 32/16 for scales = 6 bpw; the most sensitive go to 8 (10 bpw) within 7 on average
    assert 6.0 < result.stats["bits_per_weight"] <= 7.0
    assert result.stats["int8_weights"] > 0
    assert sum("8 bits" in r for r in result.rejected) == result.stats["int8_weights"]
    assert summary(model).ops["DequantizeLinear"] == 16
    assert compare(fp, run_ort(model, feeds))["cosine"] > 0.5


def test_invalid_parameters():
    with pytest.raises(ValueError, match="bits"):
        QuantizeWeightsPass(bits=3)
    with pytest.raises(ValueError, match="block_size"):
        QuantizeWeightsPass(block_size=24)
    with pytest.raises(ValueError, match="compact_scales needs blocks"):
        QuantizeWeightsPass(block_size=0, compact_scales=True)


def _wide_calibration(feeds, n, batch=8, length=48, seed=5):
    """Calibration feeds wider than the sample inputs, so that tuning has something to generalize from."""
    rng = np.random.default_rng(seed)
    past = {k: np.zeros((batch,) + v.shape[1:], v.dtype) for k, v in feeds.items() if k.startswith("past")}
    return [{**past, "input_ids": rng.integers(0, 200, size=(batch, length)),
             "attention_mask": np.ones((batch, length), np.int64),
             "position_ids": np.tile(np.arange(length), (batch, 1))} for _ in range(n)]


@pytest.mark.slow  # calibrated training / GPTQ over a model
def test_scale_tuning_lowers_held_out_divergence_and_keeps_the_integers(prepared):
    model, feeds = _llama(prepared)
    fp = run_ort(model, feeds)
    calibration = _wide_calibration(feeds, 16)
    plain, _ = _llama(prepared)
    p = QuantizeWeightsPass(method="gptq", block_size=16, min_elements=0, budget=10)
    p.calibration = calibration
    p(plain)
    tuned = QuantizeWeightsPass(method="gptq", block_size=16, min_elements=0, tune_steps=60, tune_lr=0.005, budget=10)
    tuned.calibration = calibration
    result = tuned(model)
    verify(model)
    stats = result.stats
    assert stats["tune_heldout_loss_after"] < 0.95 * stats["tune_heldout_loss_before"], stats
    # the same format: integers untouched, scales of the same shape, moved
    ints = {v.name: v.const_value.numpy() for v in plain.graph.initializers.values() if ".q4" in v.name}
    for v in model.graph.initializers.values():
        if ".q4" in v.name:
            assert np.array_equal(v.const_value.numpy(), ints[v.name])
        if v.name.endswith(".scale"):
            before = plain.graph.initializers[v.name].const_value.numpy()
            assert v.const_value.shape == before.shape and not np.allclose(v.const_value.numpy(), before)
    # and on the pipeline's own sample inputs (not calibration), closer to float than without tuning
    assert compare(fp, run_ort(model, feeds))["kl"] < compare(fp, run_ort(plain, feeds))["kl"]


@pytest.mark.slow  # calibrated training / GPTQ over a model
def test_scale_tuning_with_compact_scales_trains_only_the_channel_steps(prepared):
    model, feeds = _llama(prepared)
    calibration = _wide_calibration(feeds, 16)
    plain, _ = _llama(prepared)
    kwargs = dict(method="gptq", block_size=16, symmetric=False, compact_scales=True, min_elements=0, budget=10)
    p = QuantizeWeightsPass(**kwargs)
    p.calibration = calibration
    p(plain)
    tuned = QuantizeWeightsPass(**kwargs, tune_steps=60, tune_lr=0.005)
    tuned.calibration = calibration
    stats = tuned(model).stats
    verify(model)
    assert stats["tune_heldout_loss_after"] < 0.97 * stats["tune_heldout_loss_before"], stats
    moved = 0
    for v in model.graph.initializers.values():
        before = plain.graph.initializers[v.name].const_value.numpy()
        if v.name.endswith(".scale_step"):  # fp32 [N]: trained
            moved += not np.allclose(v.const_value.numpy(), before)
        else:  # integers, uint8 scale levels and zero points: the same bytes
            assert np.array_equal(v.const_value.numpy(), before), v.name
    assert moved == 16


def test_scale_tuning_needs_calibration(prepared):
    model, _ = _llama(prepared)
    with pytest.raises(CalibrationError, match="tune_steps"):
        QuantizeWeightsPass(method="rtn", min_elements=0, tune_steps=5)(model)
    with pytest.raises(ValueError, match="tune_steps"):
        QuantizeWeightsPass(tune_steps=-1)


def test_an_op_torch_cannot_run_skips_tuning_with_a_warning(prepared):
    model, feeds = _llama(prepared)
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    softmax.op_type = "Hardmax"  # ORT runs it; kiln's torch evaluation does not know it
    p = QuantizeWeightsPass(method="rtn", block_size=16, min_elements=0, tune_steps=5, budget=10)
    p.calibration = _wide_calibration(feeds, 4)
    result = p(model)
    verify(model)
    assert result.stats["weights_quantized"] == 16 and "tune_heldout_loss_after" not in result.stats
    assert result.warnings == ["scales not tuned: no torch evaluation for ai.onnx::Hardmax"]


@pytest.mark.slow  # calibrated training / GPTQ over a model
def test_hessians_summed_from_disk_give_the_same_weights(prepared, monkeypatch):
    """Above GRAM_MEMORY the captured activations go to disk and each Σxᵀx is summed when needed
    (released and summed again for mixed precision): the same bits as holding them all."""
    from kiln.passes import calibration as calib

    results, spilled_to = [], []
    close = calib.Grams.close
    monkeypatch.setattr(calib.Grams, "close", lambda self: (spilled_to.append(self._dir is not None), close(self)))
    for memory in (calib.GRAM_MEMORY, 0):
        monkeypatch.setattr(calib, "GRAM_MEMORY", memory)
        model, feeds = _llama(prepared)
        p = QuantizeWeightsPass(method="gptq", block_size=16, min_elements=0, max_bits_per_weight=7.0,
                                act_order=True, tune_steps=3, budget=10)
        p.calibration = _wide_calibration(feeds, 4)
        stats = p(model).stats
        results.append((stats, {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}))
    (held, a), (spilled, b) = results
    assert spilled_to == [False, True]
    assert held == spilled and held["int8_weights"] > 0
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

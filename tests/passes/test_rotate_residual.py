"""rotate-residual (QuaRot R1): Hadamard constructions, exact on RMSNorm decoders (tied head
included, one table kept), LayerNorm models left alone with the reason, and outlier channels
that weight-only int4 rounds badly are spread out."""

import numpy as np
import onnx_ir as ir
import pytest

from kiln.ir import load_model, summary, verify
from kiln.ir.values import set_const_input
from kiln.models import sample_inputs
from kiln.passes import create_pass, run_pipeline
from kiln.passes.numerics import compare, run_ort
from kiln.passes.quantization import BITS_HINT
from kiln.passes.rotate_residual import RotateResidualPass, hadamard, orthogonal

LAYERS = 2


def _model(prepared, name, recipe=("fold-constants", "simplify", "fold-constants", "pack-matmuls")):
    p = prepared(name)
    model = load_model(p.path)
    feeds = sample_inputs(p.meta, summary(model).inputs)
    run = run_pipeline(model, [create_pass(n) for n in recipe], feeds, progress=False)
    return run.model, feeds


@pytest.mark.parametrize("n", [2, 4, 12, 20, 64, 72, 576, 768, 896])
def test_hadamard_matrices(n):
    h = hadamard(n)
    assert set(np.unique(h)) == {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


@pytest.mark.parametrize("n, kind, built", [(576, "hadamard", "hadamard"), (36, "hadamard", "random"),
                                            (6, "hadamard", "random"), (64, "random", "random")])
def test_orthogonal_falls_back_to_random_where_no_hadamard_is_known(n, kind, built):
    q, got = orthogonal(n, kind, seed=3)
    assert got == built
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    np.testing.assert_array_equal(q, orthogonal(n, kind, seed=3)[0])
    assert not np.array_equal(q, orthogonal(n, kind, seed=4)[0])


@pytest.mark.parametrize("name", ["tiny-llama", *[pytest.param(n, marks=pytest.mark.slow)
                                                  for n in ["tiny-qwen2", "tiny-gemma", "tiny-phi3"]]])
def test_rotation_is_exact_on_rmsnorm_decoders(prepared, name):
    model, feeds = _model(prepared, name)
    before = run_ort(model, feeds)
    result = RotateResidualPass()(model)
    verify(model)
    assert result.modified, result.rejected
    # two norms per layer and the final one; attention output and down projection write the stream
    assert result.stats["norms"] == 2 * LAYERS + 1
    assert result.stats["writers"] == 2 * LAYERS
    assert result.stats["hadamard"] == 1
    assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-4


def test_writer_biases_are_rotated(prepared):
    """A bias Add after a projection that writes the stream (o_proj, down_proj) turns with it: b·Q."""
    model, feeds = _model(prepared, "tiny-llama")
    graph, rng = model.graph, np.random.default_rng(0)
    residual = [n for n in graph if n.op_type == "Add" and all(v is not None and v.producer() is not None
                                                              for v in n.inputs)]
    biased = 0
    for add in residual:
        for index, v in enumerate(add.inputs):
            if v.producer().op_type == "MatMul" and v.producer().inputs[1].const_value is not None:
                bias = ir.val(f"bias{biased}", const_value=ir.tensor(rng.standard_normal(64).astype(np.float32)))
                graph.register_initializer(bias)
                node = ir.node("Add", [v, bias], num_outputs=1)
                node.outputs[0].dtype, node.outputs[0].shape = v.dtype, v.shape
                graph.insert_after(v.producer(), node)
                add.replace_input_with(index, node.outputs[0])
                biased += 1
    assert biased == 2 * LAYERS
    before = run_ort(model, feeds)
    result = RotateResidualPass()(model)
    verify(model)
    assert result.stats["writers"] == 2 * LAYERS
    assert not any(f"bias{i}" in graph.initializers for i in range(biased))  # replaced by the rotated copies
    assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-4


def test_rotating_twice_stays_exact(prepared):
    """A second rotation (another seed) finds the ones-γ norms of the first and composes with it."""
    model, feeds = _model(prepared, "tiny-llama")
    before = run_ort(model, feeds)
    for seed in (0, 1):
        assert RotateResidualPass(seed=seed)(model).stats["norms"] == 2 * LAYERS + 1
    verify(model)
    assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-4


def test_tied_head_keeps_one_table(prepared):
    """The LM head reads Transpose(table): the table is rotated once and stays shared; γ of the
    final norm comes back through one inserted H×H MatMul."""
    model, feeds = _model(prepared, "tiny-llama")
    graph = model.graph
    table = next(n for n in graph if n.op_type == "Gather").inputs[0]
    head = next(n for n in graph if n.outputs[0].is_graph_output() and n.op_type == "MatMul")
    np.testing.assert_array_equal(head.inputs[1].const_value.numpy(), table.const_value.numpy().T)
    transpose = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, num_outputs=1)
    graph.insert_before(head, transpose)
    head.replace_input_with(1, transpose.outputs[0])
    before, matmuls = run_ort(model, feeds), sum(n.op_type == "MatMul" for n in graph)

    result = RotateResidualPass()(model)
    verify(model)
    assert result.stats["tied_heads"] == 1
    assert sum(n.op_type == "MatMul" for n in graph) == matmuls + 1
    readers = {u.node.op_type for u in table.uses()}
    assert readers == {"Gather", "Transpose"} and len(graph.initializers) == len(set(graph.initializers))
    assert compare(before, run_ort(model, feeds))["max_rel"] < 1e-4
    # quantize-weights is asked to keep the inserted H×H matrix at 8 bits: its error reaches the logits
    assert graph.initializers["rotate_residual.head"].metadata_props[BITS_HINT] == "8"


@pytest.mark.parametrize("name, op", [("tiny-bert", "LayerNormalization"),
                                      pytest.param("tiny-gpt2", "LayerNormalization", marks=pytest.mark.slow)])
def test_layernorm_models_are_left_unchanged(prepared, name, op):
    model, feeds = _model(prepared, name)
    before = run_ort(model, feeds)
    result = RotateResidualPass()(model)
    assert not result.modified
    assert len(result.rejected) == 1 and result.rejected[0].startswith(op)
    assert compare(before, run_ort(model, feeds))["max_abs"] == 0


def _int4_kl(prepared, outlier: float, rotate: bool) -> float:
    """KL of tiny-llama's int4 RTN model to its float model, after making input channel 7 of every
    normalized stream an outlier: γ[7] x `outlier` and the readers' weight rows 7 / `outlier`, so
    the float model is unchanged but int4 blocks along K now hold one much smaller row."""
    model, feeds = _model(prepared, "tiny-llama", ("fold-constants", "simplify", "fold-constants"))
    for node in list(model.graph):
        k = next((i for i, v in enumerate(node.inputs) if v is not None and v.const_value is not None
                  and v.const_value.shape == (64,)), None) if node.op_type == "Mul" else None
        readers = [u.node for u in node.outputs[0].uses()]
        if k is None or not all(r.op_type == "MatMul" for r in readers):
            continue
        g = node.inputs[k].const_value.numpy().copy()
        g[7] *= outlier
        set_const_input(model.graph, node, k, g, ".outlier")
        for r in readers:
            w = r.inputs[1].const_value.numpy().copy()
            w[7] /= outlier
            set_const_input(model.graph, r, 1, w, ".outlier")
    reference = run_ort(model, feeds)
    steps = [("rotate-residual", {})] if rotate else []
    steps.append(("quantize-weights", {"method": "rtn", "budget": 10.0}))
    run_pipeline(model, [create_pass(n, p) for n, p in steps], feeds, progress=False)
    return compare(reference, run_ort(model, feeds))["kl"]


@pytest.mark.slow  # int4 twice
def test_rotation_makes_int4_error_independent_of_channel_scaling(prepared):
    """Without rotation the outlier channel's small weights round away (KL 0.20 -> 0.38); with it,
    γ folds into the weights before they are rotated, so the int4 model is the same either way."""
    plain = {f: _int4_kl(prepared, f, rotate=False) for f in (1.0, 40.0)}
    rotated = {f: _int4_kl(prepared, f, rotate=True) for f in (1.0, 40.0)}
    assert plain[40.0] > 1.5 * plain[1.0], plain
    assert rotated[40.0] == pytest.approx(rotated[1.0], rel=1e-3), rotated
    assert rotated[40.0] < 0.75 * plain[40.0], (plain, rotated)


@pytest.mark.slow  # a preset with calibration (the gensim wheel), compiled and run
def test_int4_quality_preset_rotates_then_quantizes_and_runs(tmp_path):
    """The preset end to end on tiny-llama: rotation (exact), GPTQ, ORT lowering, generation."""
    import kiln

    result = kiln.compile("tiny-llama", tmp_path / "q", recipe="int4-quality", progress=False)
    records = {r["name"]: r for r in result.manifest["passes"]}
    rotate = records["rotate-residual"]
    assert rotate["modified"] and rotate["stats"]["norms"] == 2 * LAYERS + 1
    assert rotate["delta"]["max_rel"] < 1e-4
    assert records["quantize-weights"]["modified"] and records["fuse-rms-norm"]["stats"]["rms_fused"] == 2 * LAYERS + 1
    ops = result.manifest["summary"]["artifact"]["ops"]
    assert ops.get("com.microsoft::MatMulNBits", 0) > 0 and ops.get("com.microsoft::GroupQueryAttention") == LAYERS
    assert len(kiln.load(result.path).generate("hello", max_new_tokens=5).token_ids) == 5


def test_unknown_kind_and_head_bits_are_refused():
    with pytest.raises(ValueError, match="kind must be one of hadamard, random"):
        RotateResidualPass(kind="householder")
    with pytest.raises(ValueError, match="head_bits must be 0"):
        RotateResidualPass(head_bits=6)

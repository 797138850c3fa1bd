"""Quantized weights (QDQ int8/int4) through the TVM backend, on tiny random-init models.

The reference is ORT running the same quantized graph unlowered and unoptimized
(DequantizeLinear + MatMul in fp32, as the compile's cross-check runs it): the ORT backend's
lowering, and ORT's own optimizer at its default level, turn DequantizeLinear + MatMul into
MatMulNBits with int8 activations, which rounds differently (enough to change the greedy
tokens of a random tiny model)."""

import warnings

import numpy as np
import onnx_ir as ir
import pytest

import kiln
from conftest import run_kiln

pytestmark = pytest.mark.slow  # TVM compiles


def _qdq_recipe(tmp_path, base: str):
    path = tmp_path / f"{base}-qdq.toml"
    path.write_text(f'name = "{base}-qdq"\nbase = "{base}"\nlower = false\n\n[[passes]]\nname = "eliminate-dead-code"\n')
    return path


def _ort_and_tvm(tmp_path_factory, prepared, name: str, recipe: str):
    import onnxruntime as ort

    import kiln.backends.ort as ort_backend

    prepared(name)
    root = tmp_path_factory.mktemp(f"tvm-{name}-{recipe}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ort_backend._LEVELS, "all", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        kiln.compile(name, root / "ort", recipe=_qdq_recipe(root, recipe), progress=False)
        reference = kiln.load(root / "ort")  # its session is created here, at the patched level
    kiln.compile(name, root / "tvm", recipe=recipe, backend="tvm", progress=False)
    return reference, kiln.load(root / "tvm")


@pytest.fixture(scope="module")
def llama_int4(tmp_path_factory, prepared):
    return _ort_and_tvm(tmp_path_factory, prepared, "tiny-llama", "int4")


@pytest.fixture(scope="module")
def bert_int8(tmp_path_factory, prepared):
    return _ort_and_tvm(tmp_path_factory, prepared, "tiny-bert", "int8")


def _record(art, name: str) -> dict:
    return next(r for r in art.manifest["passes"] if r["name"] == name)


def test_int4_weights_stay_packed_in_the_params(llama_int4):
    _, art = llama_int4
    assert art.manifest["backend"]["lowering"] == ["expand-dequantize", "transpose-weights"]
    stats = _record(art, "expand-dequantize")["stats"]
    assert stats["dequantize_expanded"] == stats["packed_4bit"] > 0 and stats["gathers_by_row"] == 1
    assert art.manifest["compile"]["artifact_check"]["max_rel"] <= 1e-3  # the cross-check against ORT
    with np.load(art.path / "params.npz") as params:
        packed = [params[k] for k in params.files if params[k].dtype == np.uint8]
        floats = [params[k] for k in params.files if params[k].dtype == np.float32]
    assert len(packed) == stats["dequantize_expanded"]
    assert sum(a.nbytes for a in floats) < sum(a.nbytes for a in packed)  # no dequantized copy of a weight


def test_int4_greedy_tokens_equal_ort_through_prefill_and_decode(llama_int4):
    ort_art, tvm_art = llama_int4
    long_prompt = np.random.default_rng(0).integers(0, 256, size=131).tolist()  # a prefill, then decode steps
    for prompt in ["Hello, world", long_prompt]:
        assert tvm_art.generate(prompt, 16).token_ids == ort_art.generate(prompt, 16).token_ids


def test_int8_encoder_embeddings_match_ort(bert_int8):
    ort_art, tvm_art = bert_int8
    assert _record(tvm_art, "expand-dequantize")["stats"]["gathers_by_row"] >= 1  # the embedding tables
    texts = ["hello world", "a somewhat longer sentence, padded to the compiled length"]
    np.testing.assert_allclose(tvm_art.embed(texts), ort_art.embed(texts), atol=1e-4)


def test_the_dequantize_fuses_into_its_matmul_kernel():
    """FuseOps alone leaves the dequantize a kernel of its own; the backend groups the two."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from kiln.backends.tvm import _fuse_dequantize_matmul, host_target
    from kiln.passes.expand_dequantize import ExpandDequantizePass

    k, n = 128, 64
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([1, k]))
    q = np.random.default_rng(0).integers(-128, 128, size=(k, n)).astype(np.int8)
    inits = [ir.val("q", const_value=ir.tensor(q)), ir.val("s", const_value=ir.tensor(np.full((k // 32, n), 0.1, np.float32)))]
    dq = ir.node("DequantizeLinear", inits, attributes={"axis": 0, "block_size": 32}, num_outputs=1)
    mm = ir.node("MatMul", [x, dq.outputs[0]], num_outputs=1)
    mm.outputs[0].name, mm.outputs[0].dtype, mm.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape([1, n])
    model = ir.Model(ir.Graph([x], [mm.outputs[0]], nodes=[dq, mm], initializers=inits, opset_imports={"": 21},
                              name="qmm"), ir_version=10)
    model = ExpandDequantizePass()(model).model
    weight = model.graph.initializers.pop("q.blocks")  # a weight input, as the backend makes it
    weight.const_value = None
    model.graph.inputs.append(weight)
    weight.dtype, weight.shape = ir.DataType.INT8, ir.Shape([k // 32, 32, n])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mod = from_onnx(ir.to_proto(model), keep_params_in_input=False)
    with tvm.target.Target(host_target()):
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
        kernels = lambda m: {gv.name_hint for gv, f in m.functions_items() if not isinstance(f, relax.Function)}  # noqa: E731
        assert not any("cast" in name and "matmul" in name for name in kernels(mod))
        fused = kernels(_fuse_dequantize_matmul(mod))
    assert len(fused) == 1 and "cast" in next(iter(fused)) and "matmul" in next(iter(fused))


def test_a_blocked_dequantize_it_cannot_expand_is_one_line(tmp_path):
    x = ir.val("x", ir.DataType.INT8, ir.Shape([64, 8]))
    scale = ir.val("s", const_value=ir.tensor(np.ones((2, 8), np.float32)))
    dq = ir.node("DequantizeLinear", [x, scale], attributes={"axis": 0, "block_size": 32}, num_outputs=1)
    dq.outputs[0].name, dq.outputs[0].dtype, dq.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape([64, 8])
    graph = ir.Graph([x], [dq.outputs[0]], nodes=[dq], initializers=[scale], opset_imports={"": 21}, name="dq")
    path = tmp_path / "dq.onnx"
    ir.save(ir.Model(graph, ir_version=10), path)
    recipe = tmp_path / "lowered.toml"  # the preset "none" skips the backend's lowering
    recipe.write_text('name = "lowered"\n\n[[passes]]\nname = "eliminate-dead-code"\n')
    proc = run_kiln("compile", str(path), "-r", str(recipe), "-b", "tvm", "-o", str(tmp_path / "out"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "expand-dequantize" in lines[0] and "non-constant input" in lines[0]
    assert not (tmp_path / "out").exists()

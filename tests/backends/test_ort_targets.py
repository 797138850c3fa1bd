"""The ORT backend per target: npu (static shapes, QDQ, allow-list, chunked runtime) run on
the CPU EP; gpu (fp16, CUDA EP) checked STRUCTURALLY here, as this machine has no GPU
(scripts/gpu_check.py runs a gpu artifact on a CUDA machine), and run on the CPU EP."""

import json

import numpy as np
import pytest

import kiln
from conftest import run_kiln
from kiln.evaluate import evaluate_encoder
from kiln.recipes import PRESETS_DIR
from kiln.runtime.generate import Model


@pytest.fixture(scope="module")
def artifacts(compiled):
    return lambda model, target, recipe=None: compiled(model, recipe, target)


def _manifest(path):
    return json.loads((path / "kiln.json").read_text())


def _ops(m):
    return m["summary"]["artifact"]["ops"]


@pytest.mark.slow  # the npu recipe's calibrated QDQ
def test_npu_llm_is_static_qdq_within_the_allowlist(artifacts):
    m = _manifest(artifacts("tiny-llama", "npu"))
    assert m["recipe"]["name"] == "npu-int8" and m["target"]["name"] == "npu"
    assert m["target"]["static_shapes"] == {"batch": 1, "sequence": 128}
    assert all(isinstance(d, int) for io in m["io"].values() for v in io for d in v["shape"])
    assert m["io"]["inputs"][0]["shape"] == [1, 128]
    assert m["kv_cache"]["static"] and m["kv_cache"]["max_length"] == 512
    ops = _ops(m)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    assert not [op for op in ops if "::" in op]  # no contrib ops
    lowering = m["backend"]["lowering"]
    assert lowering[0] == "specialize-shapes" and lowering[-1] == "check-op-allowlist"
    assert m["backend"]["session"]["providers"] == ["CPUExecutionProvider"] and m["backend"]["session"]["chunk"] == 128
    record = next(r for r in m["passes"] if r["name"] == "quantize-activations")
    assert record["stats"]["activations_quantized"] > 0 and record["delta"]["kl"] <= record["budget"]


@pytest.fixture(scope="module")
def unquantized(tmp_path_factory) -> str:
    """npu-int8 without its quantization passes: static shapes, exact."""
    recipe = (PRESETS_DIR / "npu-int8.toml").read_text()
    path = tmp_path_factory.mktemp("recipe") / "npu-fp32.toml"
    path.write_text(recipe[:recipe.index("[[passes]]\nname = \"smooth-activations\"")])
    return str(path)


def test_static_runtime_chunks_exactly(artifacts, unquantized):
    """Without quantization the chunked static artifact reproduces the cpu artifact's logits
    (300 tokens = 2 full chunks + a padded one) and greedy tokens."""
    npu, cpu = kiln.load(artifacts("tiny-llama", "npu", unquantized)), kiln.load(artifacts("tiny-llama", "cpu", "fp32"))
    ids = np.random.default_rng(0).integers(0, 320, size=(1, 300))
    static, ref = Model(npu.session, npu.manifest), Model(cpu.session, cpu.manifest)
    assert static.chunk == 128
    a, b = static.all_logits(ids), ref.all_logits(ids)
    assert a.shape == b.shape and np.abs(a - b).max() / np.abs(b).max() < 1e-4
    prompt = list(range(5, 40))
    assert npu.generate(prompt, 8).token_ids == cpu.generate(prompt, 8).token_ids


def test_static_cache_overflow_is_one_clear_error(artifacts):
    art = kiln.load(artifacts("tiny-llama", "npu"))
    with pytest.raises(kiln.KilnError, match="exceed the static cache length 512"):
        Model(art.session, art.manifest).all_logits(np.zeros((1, 600), dtype=np.int64))


def test_npu_encoder_is_static(artifacts):
    m = _manifest(artifacts("tiny-bert", "npu"))
    assert [i["shape"] for i in m["io"]["inputs"]] == [[1, 128]] * 3
    assert "kv_cache" not in m and _ops(m)["QuantizeLinear"] > 0
    assert m["embedding"]["max_sequence_length"] == 128
    assert m["backend"]["session"]["padding"] == {"sequence": 128, "outputs": [],
                                                  "inputs": ["input_ids", "attention_mask", "token_type_ids"]}


def test_static_encoder_serves_any_batch_exactly(artifacts, unquantized):
    npu, cpu = kiln.load(artifacts("tiny-bert", "npu", unquantized)), kiln.load(artifacts("tiny-bert", "cpu", "fp32"))
    texts = ["hello world", "a much longer second sentence, padded at the end", "three"]
    a, b = npu.embed(texts), cpu.embed(texts)
    assert a.shape == b.shape == (3, 64) and np.abs(a - b).max() < 1e-5
    with pytest.raises(kiln.KilnError, match="at most 128 tokens"):
        npu.session.run(None, {k: np.ones((1, 129), np.int64) for k in npu.input_names})


def test_npu_with_a_growing_cache_fails_in_one_line(tmp_path):
    proc = run_kiln("compile", "tiny-llama", "-t", "npu", "-r", "fp32", "-o", str(tmp_path / "a"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "needs a static KV cache" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert"])
def test_gpu_artifact_structure_and_fp16_on_the_cpu_ep(artifacts, model, capfd):
    """Structural (no GPU here): fp16 weights and I/O, CUDA then CPU providers, only fused ops
    the CUDA EP has; then it runs on the CPU EP within the fp16 tolerance of the cpu artifact."""
    path = artifacts(model, "gpu")
    m = _manifest(path)
    assert m["target"]["precision"] == "fp16" and m["recipe"]["name"] == "fp32"
    assert m["backend"]["session"]["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert m["backend"]["lowering"][-1] == "convert-float16"
    assert m["summary"]["artifact"]["bytes_by_dtype"]["float16"] > 0.9 * sum(
        m["summary"]["artifact"]["bytes_by_dtype"].values())
    assert "com.microsoft::DynamicQuantizeMatMul" not in _ops(m)
    assert all(v["dtype"] in ("float16", "int64") for io in m["io"].values() for v in io)
    fused = {"tiny-llama": "com.microsoft::GroupQueryAttention", "tiny-bert": "com.microsoft::MultiHeadAttention"}
    assert fused[model] in _ops(m)
    if model == "tiny-llama":
        assert m["kv_cache"]["dtype"] == "float16"
    gpu, cpu = kiln.load(path), kiln.load(artifacts(model, "cpu", "fp32"))
    assert "CUDAExecutionProvider not available" in capfd.readouterr().err
    if model == "tiny-llama":
        ids = np.random.default_rng(1).integers(0, 320, size=(1, 40))
        a = Model(gpu.session, gpu.manifest).all_logits(ids).astype(np.float32)
        b = Model(cpu.session, cpu.manifest).all_logits(ids)
        assert np.abs(a - b).max() / np.abs(b).max() < 1e-2
    else:
        a, b = gpu.embed(["hello world", "a second sentence"]), cpu.embed(["hello world", "a second sentence"])
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert a.dtype == np.float16 and cos.min() > 0.999
        report = evaluate_encoder(gpu, cpu, limit=20)  # in float64: fp16 arithmetic gave cosines above 1
        assert 0.999 < report.cosine_mean <= 1.0


@pytest.mark.slow  # the int4 recipe tunes its scales: about a minute of CPU
def test_gpu_int4_lowers_to_fp16_matmulnbits(artifacts):
    m = _manifest(artifacts("tiny-llama", "gpu", "int4"))
    assert "com.microsoft::MatMulNBits" in _ops(m)
    record = next(r for r in m["passes"] if r["name"] == "lower-matmul-nbits")
    assert record["exact"]  # accuracy_level 0: the CUDA kernel dequantizes, no int8 activations


def test_compact_scales_stay_compact_only_where_ort_folds_them_at_load():
    """MatMulNBits with int8 activations reads unfolded compact scales wrongly, and a target that
    turns graph optimizations off does not fold them: it gets float32 scales in the file."""
    import dataclasses

    from kiln.backends.ort import OrtBackend
    from kiln.targets import get_target

    def lowering(level):
        target = dataclasses.replace(get_target("cpu"), graph_optimization_level=level)
        return next(p for p in OrtBackend().lowering_passes(target) if p.name == "lower-matmul-nbits")

    assert lowering("all").compact_scales and lowering("basic").compact_scales
    assert not lowering("disable").compact_scales

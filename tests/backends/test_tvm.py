"""The TVM backend on tiny random-init models: artifacts, numerics against ORT, errors."""

import json
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

import kiln
from conftest import run_kiln
from kiln.backends.tvm import host_target
from kiln.errors import KilnError

pytestmark = pytest.mark.slow  # TVM compiles (and tunes)


def _ort_and_tvm(tmp_path_factory, prepared, name: str):
    """The same fp32 recipe compiled for both backends, loaded."""
    prepared(name)
    root = tmp_path_factory.mktemp(f"tvm-{name}")
    for backend in ("ort", "tvm"):
        kiln.compile(name, root / backend, recipe="fp32", backend=backend, progress=False)
    return kiln.load(root / "ort"), kiln.load(root / "tvm")


@pytest.fixture(scope="module")
def llama(tmp_path_factory, prepared):
    return _ort_and_tvm(tmp_path_factory, prepared, "tiny-llama")


@pytest.fixture(scope="module")
def bert(tmp_path_factory, prepared):
    return _ort_and_tvm(tmp_path_factory, prepared, "tiny-bert")


def test_llm_artifact_has_prefill_and_decode_over_a_static_cache(llama):
    _, art = llama
    m = art.manifest
    assert {p.name for p in art.path.iterdir()} == {"prefill.so", "decode.so", "params.npz", "kiln.json", "tokenizer.json"}
    backend = m["backend"]
    assert backend["name"] == "tvm" and backend["target"] == host_target()
    assert backend["target"]["kind"] == "llvm" and backend["target"]["mcpu"] not in ("", "generic")
    assert {fn: f["sequence"] for fn, f in backend["functions"].items()} == {"prefill": 128, "decode": 1}
    assert m["kv_cache"]["static"] and m["kv_cache"]["max_length"] == 256
    assert backend["tuning"]["tasks"] > 0 and backend["tuning"]["trials"] == 0
    assert m["compile"]["artifact_check"]["max_rel"] <= 1e-3  # the cross-check against ORT


def test_greedy_tokens_equal_ort_through_prefill_and_decode(llama):
    ort_art, tvm_art = llama
    rng = np.random.default_rng(0)
    long_prompt = rng.integers(0, 256, size=131).tolist()  # one 128-token prefill, then 3 decode steps
    for prompt in ["Hello, world", "a", long_prompt]:
        assert tvm_art.generate(prompt, 24).token_ids == ort_art.generate(prompt, 24).token_ids
    prompts = ["Hello, world", "The quick brown fox jumps"]
    assert [g.token_ids for g in tvm_art.generate_batch(prompts, 8)] == [ort_art.generate(p, 8).token_ids for p in prompts]


def test_cli_runs_a_tvm_artifact(llama):
    _, art = llama
    proc = run_kiln("run", str(art.path), "--prompt", "Hello", "-n", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["token_ids"] == art.generate("Hello", 5).token_ids


KILN_RUN_PROBE = """
import json, sys
sys.argv = ["kiln", "run", {path!r}, "--prompt", "Hello", "-n", "5", "--json"]
from kiln.cli import main
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
import tvm.base
# not torch: tvm_ffi's __init__ tries `import torch` whatever the settings (where it is not
# installed, as in the runtime venv of tests/e2e/test_runtime_venv.py, nothing is imported)
mods = sorted(m for m in sys.modules if m.startswith(("tvm.relax", "tvm.s_tir", "tvm.meta_schedule", "kiln.passes",
                                                      "kiln.models", "kiln.backends.tvm.backend", "onnx_ir",
                                                      "onnxscript", "transformers")))
print()
print(json.dumps({{"runtime_only": tvm.base._RUNTIME_ONLY, "modules": mods}}))
"""


def test_kiln_run_loads_tvm_runtime_alone(llama):
    """`kiln run` on a TVM artifact loads libtvm_runtime alone (TVM_USE_RUNTIME_LIB), imports
    neither tvm.relax nor kiln's compiler, and gives the same tokens."""
    _, art = llama
    proc = subprocess.run([sys.executable, "-c", KILN_RUN_PROBE.format(path=str(art.path))], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[0])["token_ids"] == art.generate("Hello", 5).token_ids
    probe = json.loads(lines[-1])
    assert probe == {"runtime_only": True, "modules": []}


def test_encoder_embeddings_match_ort(bert):
    ort_art, tvm_art = bert
    texts = ["hello world", "a somewhat longer sentence, padded to the compiled length"]
    np.testing.assert_allclose(tvm_art.embed(texts), ort_art.embed(texts), atol=1e-4)
    assert tvm_art.manifest["backend"]["functions"]["main"]["sequence"] == 128


def test_input_longer_than_the_compiled_sequence_is_one_error(bert):
    _, art = bert
    with pytest.raises(KilnError, match="at most 128 tokens"):
        art.embed(["word " * 300])


def test_an_op_tvm_cannot_import_is_one_line_and_no_artifact(tmp_path):
    x = ir.val("x", ir.DataType.INT64, ir.Shape([2, 3]))
    cast = ir.node("Cast", [x], attributes={"to": ir.DataType.FLOAT}, num_outputs=1)
    celu = ir.node("Celu", [cast.outputs[0]], num_outputs=1)
    for value in (cast.outputs[0], celu.outputs[0]):
        value.dtype, value.shape = ir.DataType.FLOAT, ir.Shape([2, 3])
    celu.outputs[0].name = "y"
    graph = ir.Graph([x], [celu.outputs[0]], nodes=[cast, celu], opset_imports={"": 21}, name="celu")
    model = ir.Model(graph, ir_version=10)
    path = tmp_path / "celu.onnx"
    ir.save(model, path)
    proc = run_kiln("compile", str(path), "-r", "none", "-b", "tvm", "-o", str(tmp_path / "out"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "TVM cannot import the graph for 'main'" in lines[0] and "Celu" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_cross_check_mismatch_fails_the_compile_and_leaves_nothing(tmp_path, prepared, monkeypatch):
    from kiln.backends.tvm.session import TvmSession

    call = TvmSession._call

    def off_by_a_little(self, fn, feeds):
        return {k: self._tensor(v.numpy() + 0.1) for k, v in call(self, fn, feeds).items()}

    monkeypatch.setattr(TvmSession, "_call", off_by_a_little)
    prepared("tiny-bert")
    with pytest.raises(KilnError, match="disagrees"):
        kiln.compile("tiny-bert", tmp_path / "out", recipe="fp32", backend="tvm", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_tune_minutes_is_for_the_tvm_backend(tmp_path):
    proc = run_kiln("compile", "tiny-llama", "--tune-minutes", "1", "-o", str(tmp_path / "out"))
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: ")
    assert "--tune-minutes is for --backend tvm" in proc.stderr


def test_tuning_fills_the_database_and_a_recompile_reuses_it(tmp_path, prepared, monkeypatch):
    """A tiny budget tunes the largest kernel (one batch of trials); the recompile finds its record."""
    import kiln.backends.tvm.backend as tvm_backend

    (tmp_path / "tuning").mkdir()
    monkeypatch.setattr(tvm_backend, "tuning_dir", lambda target: tmp_path / "tuning")  # a fresh database
    prepared("tiny-bert")
    tuned = kiln.compile("tiny-bert", tmp_path / "a", recipe="fp32", backend="tvm", tune_minutes=0.01, progress=False)
    tuning = tuned.manifest["backend"]["tuning"]
    assert tuning["trials"] > 0 and tuning["tasks_with_record"] >= 1
    again = kiln.compile("tiny-bert", tmp_path / "b", recipe="fp32", backend="tvm", progress=False)
    assert again.manifest["backend"]["tuning"]["trials"] == 0
    assert again.manifest["backend"]["tuning"]["tasks_with_record"] == tuning["tasks_with_record"]
    assert again.manifest["compile"]["artifact_check"]["max_rel"] <= 1e-3


def test_inspect_refuses_a_tvm_artifact_in_one_line(llama):
    _, art = llama
    proc = run_kiln("inspect", str(art.path))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "compiled code, not an ONNX graph" in proc.stderr


def test_a_causal_lm_defaults_to_int4_on_ort_and_fp32_on_tvm():
    from kiln.recipes import default_recipe
    from kiln.targets import get_target

    cpu = get_target("cpu")
    assert default_recipe(cpu, "ort", "causal-lm") == "int4"
    assert default_recipe(cpu, "tvm", "causal-lm") == "fp32"  # untuned TVM int4 is slower than fp32
    assert default_recipe(cpu, "ort", "embedding") == "fp32"
    assert default_recipe(get_target("npu"), "ort", "causal-lm") == "npu-int8"

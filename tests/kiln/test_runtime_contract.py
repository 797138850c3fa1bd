"""The runtime reads the artifact contract alone: it imports nothing of the compiler, takes the
cache names from the manifest's templates, and honours kv_cache.max_positions."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from artifact_edits import copy_artifact, edit_manifest, rename_cache
from conftest import run_kiln

import kiln
from kiln.errors import KilnError
from kiln.manifest import KVLayout, cache_names, check_manifest

PROMPT = "Hello, world"


@pytest.fixture(scope="module")
def tiny(compiled):
    """tiny-llama, fp32, with its dynamic, shared-buffer KV cache."""
    return compiled("tiny-llama", "fp32")


@pytest.fixture(scope="module")
def tiny_static(tmp_path_factory, compiled):
    recipe = tmp_path_factory.mktemp("rt-static") / "static.toml"
    recipe.write_text("\n".join(f'[[passes]]\nname = "{n}"' for n in
                                ["fold-constants", "simplify", "eliminate-common-subexpressions"])
                      + '\n[[passes]]\nname = "insert-kv-cache"\nstatic_length = 48\n')
    return compiled("tiny-llama", recipe)


# Modules only the compiler needs: none may be imported by the runtime (docs/runtime.md).
COMPILER = ("kiln.passes", "kiln.models", "kiln.ir", "kiln.compiler", "kiln.reference", "torch", "onnxscript",
            "onnx_ir", "onnx", "transformers", "networkx", "tvm", "tvm_ffi")

IMPORT_PROBE = """
import json, sys
COMPILER = {compiler!r}
def loaded():
    return sorted(m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in COMPILER))
stages = {{}}
import kiln.runtime
stages["import kiln.runtime"] = loaded()
art = kiln.runtime.load({path!r})
art.generate("Hello", 4)
art.generate_batch(["Hello", "Hello, world"], 3)
stages["load and generate"] = loaded()
from kiln.cli import main
sys.argv = ["kiln", "run", {path!r}, "--prompt", "Hello", "-n", "4"]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
stages["kiln run"] = loaded()
import kiln.bench, kiln.evaluate, kiln.corpus  # what `kiln bench` and `kiln eval --text FILE` import
stages["kiln bench, kiln eval"] = loaded()
import uvicorn
from kiln.serve.app import Settings, create_app
from kiln.serve.models import load_all
create_app(load_all([{path!r}], None, True), Settings())  # what `kiln serve` imports and builds
stages["kiln serve"] = loaded()
print()
print(json.dumps(stages))
"""


def test_the_runtime_imports_nothing_of_the_compiler(tiny):
    """In a fresh interpreter: importing kiln.runtime, loading and running an artifact, `kiln run` and
    the `kiln serve` app load no compile-time module (the passes, the model sources, torch, onnx, onnxscript, TVM)."""
    probe = IMPORT_PROBE.format(compiler=COMPILER, path=str(tiny))
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stages = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(stages) == ["import kiln.runtime", "load and generate", "kiln run", "kiln bench, kiln eval",
                            "kiln serve"]
    for stage, modules in stages.items():
        assert modules == [], f"{stage} imported {modules[:8]}"


def test_errors_targets_and_manifest_are_leaves():
    """kiln.errors, kiln.targets and kiln.manifest import without the face importing the passes."""
    probe = ("import sys; import kiln.errors, kiln.targets, kiln.manifest, kiln; "
             "print(sorted(m for m in sys.modules if m.startswith(('kiln.passes', 'kiln.models', 'kiln.ir', 'torch'))))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    # ... and the face still resolves the compiler's names on first use
    assert kiln.KilnPass.__module__ == "kiln.passes.base" and callable(kiln.register_pass)


def test_kv_layout_reads_and_writes_the_manifest_section(tiny):
    section = json.loads((tiny / "kiln.json").read_text())["kv_cache"]
    layout = KVLayout.from_manifest(section)
    assert layout.as_dict() == section  # nothing lost, nothing added
    assert layout.past_names[1] == ("past_key_values.1.key", "past_key_values.1.value")
    assert layout.cache_pairs()["past_key_values.0.value"] == "present.0.value"
    assert cache_names("kv.{layer}.{key|value}: commentary", 2) == [("kv.0.key", "kv.0.value"), ("kv.1.key", "kv.1.value")]


@pytest.mark.parametrize("shared", [True, False])
def test_cache_names_come_from_the_manifest_templates(tiny, tmp_path, shared):
    """An artifact whose cache inputs and outputs were renamed in the graph, with the manifest's
    past/present templates changed to match, generates the same tokens (shared buffer or not)."""
    want = kiln.load(tiny)
    renamed = copy_artifact(tiny, tmp_path / "renamed")
    manifest = rename_cache(renamed)
    if not shared:
        manifest["kv_cache"]["shared_buffer"] = False
        edit_manifest(renamed, kv_cache=manifest["kv_cache"])
    check_manifest(json.loads((renamed / "kiln.json").read_text()))
    art = kiln.load(renamed)
    model = art._lm()
    assert model.past_names[0] == "layer0/cache_in_key" and model.present_names[-1] == "layer1/cache_out_value"
    assert model.shared == shared
    assert art.generate(PROMPT, 16).token_ids == want.generate(PROMPT, 16).token_ids
    prompts = [PROMPT, "The quick brown fox jumps"]
    assert [g.token_ids for g in art.generate_batch(prompts, 8)] == [g.token_ids for g in want.generate_batch(prompts, 8)]
    assert art.beam_search(PROMPT, 3, 6).token_ids == want.beam_search(PROMPT, 3, 6).token_ids


def test_static_cache_names_come_from_the_manifest_templates(tiny_static, tmp_path):
    want = kiln.load(tiny_static)
    renamed = copy_artifact(tiny_static, tmp_path / "renamed")
    rename_cache(renamed, past="in.{layer}.{key|value}", present="out.{layer}.{key|value}")
    assert kiln.load(renamed).generate(PROMPT, 12).token_ids == want.generate(PROMPT, 12).token_ids


def test_templates_that_name_no_graph_value_are_refused(tiny, tmp_path):
    broken = copy_artifact(tiny, tmp_path / "broken")
    manifest = json.loads((broken / "kiln.json").read_text())
    manifest["kv_cache"]["past"] = "missing.{layer}.{key|value}"
    edit_manifest(broken, kv_cache=manifest["kv_cache"])
    with pytest.raises(KilnError, match="kv_cache names 'missing.0.key'.*no such input"):
        kiln.load(broken).generate(PROMPT, 2)


def _limited(tiny, tmp_path, limit: int):
    art = copy_artifact(tiny, tmp_path / f"limit{limit}")
    manifest = json.loads((art / "kiln.json").read_text())
    manifest["kv_cache"]["max_positions"] = limit
    edit_manifest(art, kv_cache=manifest["kv_cache"])
    return art


def test_generation_stops_at_max_positions(tiny, tmp_path):
    """kv_cache.max_positions (the model's learned positions) bounds prompt + generated tokens:
    generation stops there with stop_reason "length", the same tokens as without the limit."""
    free = kiln.load(tiny)
    art = kiln.load(_limited(tiny, tmp_path, 20))
    prompt = art.encode(PROMPT)
    assert len(prompt) < 20
    gen = art.generate(PROMPT, 40)
    assert len(prompt) + len(gen.token_ids) == 20 and gen.stop_reason == "length"
    assert gen.token_ids == free.generate(PROMPT, 20 - len(prompt)).token_ids
    for out in art.generate_batch([PROMPT, "Hi"], 40):
        assert len(out.prompt_ids) + len(out.token_ids) == 20 and out.stop_reason == "length"
    for out in art.generate_continuous([PROMPT, "Hi"], 40, arrivals=[0, 2]):
        assert len(out.prompt_ids) + len(out.token_ids) == 20
    beam = art.beam_search(PROMPT, 2, 40)
    assert len(prompt) + len(beam.token_ids) <= 20
    # generations that end before the limit are untouched
    assert art.generate(PROMPT, 3).token_ids == free.generate(PROMPT, 3).token_ids


def test_a_prompt_past_max_positions_is_refused(tiny, tmp_path):
    art = kiln.load(_limited(tiny, tmp_path, 20))
    long_prompt = "The quick brown fox jumps over the lazy dog"
    assert len(art.encode(long_prompt)) >= 20
    for call in (lambda: art.generate(long_prompt, 4), lambda: art.generate_batch([PROMPT, long_prompt], 4),
                 lambda: art.beam_search(long_prompt, 2, 4)):
        with pytest.raises(KilnError, match=r"the prompt has \d+ tokens; the model takes at most 20 positions"):
            call()


def test_kiln_run_says_where_max_positions_stopped_it(tiny, tmp_path):
    path = _limited(tiny, tmp_path, 20)
    proc = run_kiln("run", str(path), "--prompt", PROMPT, "-n", "40")
    assert proc.returncode == 0, proc.stderr
    assert "stopped at the model's limit of 20 positions" in proc.stderr
    proc = run_kiln("run", str(path), "--prompt", PROMPT, "-n", "40", "--json")
    payload = json.loads(proc.stdout)
    assert payload["stop_reason"] == "length" and payload["max_positions"] == 20
    proc = run_kiln("run", str(path), "--prompt", "The quick brown fox jumps over the lazy dog", "-n", "4")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: the prompt has ")


def test_one_static_chunking_serves_any_batch_and_length():
    """kiln.backends.static: padding and row splitting are exact for a position-wise function."""
    from kiln.backends.static import chunk_spans, pad_chunk, run_padded, run_rows

    calls = []

    def fixed(feeds):  # a "graph" of batch 1 and 8 tokens: y = 2x + 1, position-wise
        assert feeds["x"].shape == (1, 8)
        calls.append(1)
        return {"y": feeds["x"] * 2 + 1}

    x = np.arange(10).reshape(2, 5)
    out = run_rows(lambda row: run_padded(fixed, row, {"x": 1, "y": 1}, 8), {"x": x}, {"x": 0, "y": 0})
    assert np.array_equal(out["y"], x * 2 + 1) and len(calls) == 2
    with pytest.raises(KilnError, match="at most 8 tokens"):
        run_padded(fixed, {"x": np.zeros((1, 9))}, {"x": 1}, 8)
    assert chunk_spans(10, 4) == [(0, 4), (4, 4), (8, 2)]
    step = pad_chunk({"ids": np.array([[5, 6]]), "cache_position": np.array([8, 9]), "mask": np.ones((1, 16))},
                     {"ids": 1, "cache_position": 0}, 4, 10)
    assert step["ids"].tolist() == [[5, 6, 6, 6]] and step["cache_position"].tolist() == [8, 9, 10, 11]


# The compiler made unimportable, as on a box with only the runtime installed.
BLOCK_COMPILER = """
import importlib.abc, sys
class _NoCompiler(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named '{{name}}'", name=name)
sys.meta_path.insert(0, _NoCompiler())
sys.argv = ["kiln", *{argv!r}]
from kiln.cli import main
main()
"""
BLOCKED = ["torch", "transformers", "onnx", "onnx_ir", "onnxscript", "networkx", "tvm", "tvm_ffi"]


def _without_compiler(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_COMPILER.format(blocked=BLOCKED, argv=list(argv))],
                          capture_output=True, text=True, timeout=300)


def test_without_the_compiler_kiln_run_works_and_compile_commands_name_the_extra(tiny, tmp_path):
    proc = _without_compiler("run", str(tiny), "--prompt", PROMPT, "-n", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["token_ids"] == kiln.load(tiny).generate(PROMPT, 8).token_ids
    for argv in (["compile", "tiny-llama", "-o", str(tmp_path / "x")], ["models"], ["passes"], ["inspect", str(tiny)]):
        proc = _without_compiler(*argv)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 1 and len(lines) == 1, (argv, proc.stderr)
        assert lines[0].startswith("error: ") and "pip install 'kiln[compile]'" in lines[0], lines[0]
        assert f"`kiln {argv[0]}`" in lines[0] or "kiln.compile" in lines[0], lines[0]

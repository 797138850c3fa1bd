"""An artifact is data: loading one runs no code from it (chat templates in jinja2's sandbox, TVM
libraries only from inside it and only when their hash matches), reaches no file outside it, and
a damaged or changed file is one line naming it. Runtime inputs that used to crash (an invalid
UTF-8 prompt, a broken tokenizer.json, a manifest whose KV layout disagrees with the graph, a
declared size no machine holds) are one line each (issue 29)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from artifact_edits import copy_artifact, edit_manifest
from conftest import assert_one_line_error, run_kiln

from kiln.manifest import ManifestError, artifact_path, describe_files, read_manifest, sha256_file
from kiln.runtime import ArtifactError, load, render_chat_template
from kiln.runtime.generate import GenerationError


@pytest.fixture(scope="module")
def llm(compiled) -> Path:
    return compiled("tiny-llama", "fp32")


@pytest.fixture(scope="module")
def bert(compiled) -> Path:
    return compiled("tiny-bert", "fp32")


def _manifest(artifact: Path) -> dict:
    return json.loads((artifact / "kiln.json").read_text())


def _write(artifact: Path, manifest: dict) -> None:
    (artifact / "kiln.json").write_text(json.dumps(manifest, indent=2))


# --- 0. no code from an artifact: chat templates --------------------------------------------------

def _payload(marker: Path) -> str:
    return "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"


def test_the_payload_is_real_outside_the_sandbox(tmp_path):
    # the control: a plain jinja2 Environment (what kiln used before) runs it
    import jinja2

    marker = tmp_path / "MARKER"
    jinja2.Environment().from_string(_payload(marker)).render()
    assert marker.exists()


def test_chat_template_payload_is_refused(llm, tmp_path):
    art = copy_artifact(llm, tmp_path / "a")
    marker = tmp_path / "MARKER"
    generation = {**_manifest(art)["generation"], "chat_template": _payload(marker)}
    edit_manifest(art, generation=generation)
    proc = run_kiln("run", str(art), "--chat", "-p", "hi", "-n", "2")
    assert_one_line_error(proc, "the chat template (generation.chat_template)", "sandbox", "refused")
    assert not marker.exists()
    assert proc.stdout == ""


@pytest.mark.parametrize("template, fragment", [
    ("{{ raise_exception('no system role') }}", "cannot be rendered: TemplateError: no system role"),
    ("{% for m in messages %}{{ m.content", "is not a valid Jinja template"),
    ("{{ messages.append(1) }}", "sandbox"),  # the immutable sandbox: no mutation of the caller's data
])
def test_chat_template_failures_are_one_line(template, fragment):
    with pytest.raises(ArtifactError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        render_chat_template(template, [{"role": "user", "content": "hi"}])


def test_chat_template_renders_as_transformers_does():
    template = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
                "<{{ m.role }}>{{ m.content | tojson }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "hé"}]
    assert render_chat_template(template, messages) == '<user>"hé"\n<assistant>'


# --- 0. no code from an artifact: TVM libraries ----------------------------------------------------

@pytest.fixture
def fake_tvm(monkeypatch, tmp_path):
    """A stand-in `tvm` whose load_module leaves a marker: whether a library was loaded at all."""
    marker = tmp_path / "LOADED"
    tvm = types.ModuleType("tvm")
    tvm.runtime = types.SimpleNamespace(load_module=lambda path: marker.write_text(path) or object(),
                                        tensor=lambda x: x)
    tvm.cpu = lambda: None
    tvm.get_global_func = lambda name: (lambda *a: None)
    vm = types.ModuleType("tvm.runtime.vm")
    vm.VirtualMachine = lambda module, device: object()
    monkeypatch.setitem(sys.modules, "tvm", tvm)
    monkeypatch.setitem(sys.modules, "tvm.runtime", tvm.runtime)
    monkeypatch.setitem(sys.modules, "tvm.runtime.vm", vm)
    return marker


def _tvm_artifact(bert: Path, directory: Path, library: str, sha256: str | None) -> Path:
    """tiny-bert's manifest with a TVM backend whose `main` is `library`."""
    art = copy_artifact(bert, directory)
    import numpy as np

    np.savez(art / "params.npz", w=np.zeros(2, dtype=np.float32))
    manifest = _manifest(art)
    spec = {"library": library, "sequence": 8, "inputs": ["input_ids"], "outputs": ["embedding"], "params": ["w"]}
    if sha256:
        spec["sha256"] = sha256
    manifest["backend"] = {"name": "tvm", "session": {}, "params": "params.npz", "functions": {"main": spec},
                           "target": {"kind": "llvm"}, "sequence_axes": {"input_ids": 1}, "batch_axes": {"input_ids": 0}}
    manifest["files"] = describe_files(art)
    _write(art, manifest)
    return art


@pytest.mark.parametrize("library", ["../evil.so", "ABSOLUTE", "sub/../main.so", "./main.so"])
def test_tvm_library_outside_the_artifact_is_refused_before_loading(bert, tmp_path, fake_tvm, library):
    evil = tmp_path / "evil.so"
    evil.write_bytes(b"\x7fELF not really")
    library = str(evil) if library == "ABSOLUTE" else library
    art = _tvm_artifact(bert, tmp_path / "a", library, sha256_file(evil))
    with pytest.raises(ManifestError, match="backend.functions.main.library"):
        load(art)
    assert not fake_tvm.exists()
    # and on the command line: one line, exit 1
    assert_one_line_error(run_kiln("run", str(art), "--text", "hi"), "backend.functions.main.library", "refused")


def test_tvm_library_symlinked_outside_is_refused(bert, tmp_path, fake_tvm):
    evil = tmp_path / "evil.so"
    evil.write_bytes(b"payload")
    art = _tvm_artifact(bert, tmp_path / "a", "main.so", sha256_file(evil))
    (art / "main.so").symlink_to(evil)
    with pytest.raises(ManifestError, match="resolves outside the artifact"):
        load(art)
    assert not fake_tvm.exists()


def test_tvm_library_hash_mismatch_is_refused_before_loading(bert, tmp_path, fake_tvm):
    art = _tvm_artifact(bert, tmp_path / "a", "main.so", None)
    (art / "main.so").write_bytes(b"the library as compiled")
    manifest = _manifest(art)
    manifest["files"] = describe_files(art)
    manifest["backend"]["functions"]["main"]["sha256"] = sha256_file(art / "main.so")
    _write(art, manifest)
    (art / "main.so").write_bytes(b"the library swapped in!")  # same size: only the hash tells
    with pytest.raises(ManifestError, match="main.so .*does not match its sha256"):
        load(art)
    assert not fake_tvm.exists()
    assert_one_line_error(run_kiln("run", str(art), "--text", "hi"), "TVM library main.so", "does not match its sha256")


def test_tvm_library_without_a_recorded_hash_is_refused(bert, tmp_path, fake_tvm):
    art = _tvm_artifact(bert, tmp_path / "a", "main.so", None)
    (art / "main.so").write_bytes(b"code")
    manifest = _manifest(art)
    del manifest["files"]
    _write(art, manifest)
    with pytest.raises(ManifestError, match="has no sha256 in the manifest"):
        load(art)
    assert not fake_tvm.exists()


def test_tvm_library_that_matches_is_loaded(bert, tmp_path, fake_tvm):
    # the control: the same fake TVM does load a library whose hash matches
    art = _tvm_artifact(bert, tmp_path / "a", "main.so", None)
    (art / "main.so").write_bytes(b"code")
    manifest = _manifest(art)
    manifest["files"] = describe_files(art)
    _write(art, manifest)
    from kiln.backends.tvm.session import TvmSession

    TvmSession(art, manifest["backend"], files=manifest["files"])
    assert fake_tvm.read_text() == str(art / "main.so")


# --- 2. containment -----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("backend.model", "/etc/passwd"),
    ("backend.model", "../other/model.onnx"),
    ("backend.model", "./model.onnx"),
    ("backend.model", "x/../model.onnx"),
    ("backend.model", "model.onnx\\..\\..\\x"),
    ("backend.external_data", "../other/model.onnx.data"),
    ("tokenizer", "../other/tokenizer.json"),
    ("tokenizer", "/etc/passwd"),
])
def test_paths_outside_the_artifact_are_refused(llm, tmp_path, field, value):
    copy_artifact(llm, tmp_path / "other")
    art = copy_artifact(llm, tmp_path / "a")
    manifest = _manifest(art)
    section, _, key = field.rpartition(".")
    (manifest[section] if section else manifest)[key] = value
    _write(art, manifest)
    with pytest.raises(ManifestError, match=f"{field} '.*' is not a plain relative path|{field} '.*' resolves outside"):
        load(art)


def test_path_outside_is_one_line_on_the_command_line(llm, tmp_path):
    art = copy_artifact(llm, tmp_path / "a")
    edit_manifest(art, tokenizer="../b/tokenizer.json")
    assert_one_line_error(run_kiln("run", str(art), "-p", "hi", "-n", "2"), "tokenizer '../b/tokenizer.json'",
                          "not a plain relative path")


def test_symlinked_model_is_refused(llm, tmp_path):
    other = copy_artifact(llm, tmp_path / "other")
    art = copy_artifact(llm, tmp_path / "a")
    (art / "model.onnx").unlink()
    (art / "model.onnx").symlink_to(other / "model.onnx")
    with pytest.raises(ManifestError, match="backend.model 'model.onnx' resolves outside the artifact"):
        load(art)


def test_files_record_outside_is_refused(llm, tmp_path):
    art = copy_artifact(llm, tmp_path / "a")
    manifest = _manifest(art)
    manifest["files"]["../x"] = {"bytes": 1, "sha256": "0" * 64}
    _write(art, manifest)
    with pytest.raises(ManifestError, match=r"files\['../x'\]"):
        load(art)


def test_artifact_path_accepts_plain_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "sub" / "f")  # a symlink that stays inside is fine
    assert artifact_path(tmp_path, "sub/f", "f") == tmp_path / "sub" / "f"
    assert artifact_path(tmp_path, "link", "f") == tmp_path / "link"
    for bad in ("", "/f", "..", "sub//f", "sub/", "C:f"):
        with pytest.raises(ManifestError, match="field"):
            artifact_path(tmp_path, bad, "field")
    with pytest.raises(ManifestError, match="field is not a file name"):
        artifact_path(tmp_path, 5, "field")


# --- 3. integrity ----------------------------------------------------------------------------------

def test_the_manifest_records_every_file(llm):
    manifest = read_manifest(llm)
    names = sorted(p.name for p in llm.iterdir() if p.name != "kiln.json")
    assert sorted(manifest["files"]) == names
    for name, record in manifest["files"].items():
        assert record == {"bytes": (llm / name).stat().st_size, "sha256": sha256_file(llm / name)}


def test_zeroed_weights_are_caught_by_verify(llm, tmp_path):
    art = copy_artifact(llm, tmp_path / "a")
    data = art / "model.onnx.data"
    data.write_bytes(bytes(data.stat().st_size))  # same size: only the hash tells
    assert run_kiln("run", str(art), "-p", "hi", "-n", "2").returncode == 0  # sizes only, by default
    for command in (["run", str(art), "-p", "hi", "-n", "2"], ["bench", str(art), "--repeats", "1"],
                    ["eval", str(art), "--windows", "1"]):
        assert_one_line_error(run_kiln(*command, "--verify"), "file model.onnx.data does not match its sha256")
    with pytest.raises(ManifestError, match="model.onnx.data does not match"):
        load(art, verify=True)


def test_truncated_file_is_refused_without_verify(llm, tmp_path):
    art = copy_artifact(llm, tmp_path / "a")
    data = art / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    size = data.stat().st_size
    assert_one_line_error(run_kiln("run", str(art), "-p", "hi", "-n", "2"),
                          f"file model.onnx.data has {size} bytes, the manifest records {size + 100}")


def test_missing_file_is_refused(llm, tmp_path):
    art = copy_artifact(llm, tmp_path / "a")
    (art / "model.onnx.data").unlink()
    assert_one_line_error(run_kiln("run", str(art), "-p", "hi", "-n", "2"), "file model.onnx.data is missing")


def test_artifact_without_files_loads_but_cannot_be_verified(llm, tmp_path):
    art = copy_artifact(llm, tmp_path / "a")
    manifest = _manifest(art)
    del manifest["files"]
    _write(art, manifest)
    assert load(art).generate("hi", 2).token_ids
    assert_one_line_error(run_kiln("run", str(art), "-p", "hi", "-n", "2", "--verify"), "cannot verify",
                          "records no file sizes and hashes")


# --- runtime inputs that used to crash ----------------------------------------------------------------

def test_invalid_utf8_prompt_and_text(llm, bert):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of non-UTF-8 argv bytes
    proc = run_kiln("run", str(llm), "-p", bad, "-n", "2")
    assert_one_line_error(proc, "the prompt is not valid UTF-8 text")
    assert proc.stdout == ""
    assert_one_line_error(run_kiln("run", str(bert), "--text", bad), "a --text is not valid UTF-8 text")
    with pytest.raises(ArtifactError, match="a text is not valid UTF-8"):
        load(bert).embed(["ok", bad])
    with pytest.raises(ArtifactError, match="the prompt is not valid UTF-8"):
        load(llm).generate(bad, 2)


@pytest.mark.parametrize("damage, fragment", [
    ("missing", "the tokenizer tokenizer.json (manifest `tokenizer`) is missing"),
    ("empty", "the tokenizer tokenizer.json cannot be read"),
    ("garbage", "the tokenizer tokenizer.json cannot be read"),
])
def test_broken_tokenizer(llm, tmp_path, damage, fragment):
    art = copy_artifact(llm, tmp_path / "a")
    tok = art / "tokenizer.json"
    if damage == "missing":
        tok.unlink()
    else:
        tok.write_bytes(b"" if damage == "empty" else b"\x00garbage{")
    manifest = _manifest(art)
    del manifest["files"]  # so that the tokenizer itself is read (sizes are checked first otherwise)
    _write(art, manifest)
    assert_one_line_error(run_kiln("run", str(art), "-p", "hi", "-n", "2"), fragment)


@pytest.mark.parametrize("field", ["kv_heads", "head_dim", "value_head_dim"])
def test_kv_layout_that_disagrees_with_the_graph(llm, tmp_path, field):
    art = copy_artifact(llm, tmp_path / "a")
    kv = _manifest(art)["kv_cache"]
    edit_manifest(art, kv_cache={**kv, field: kv[field] + 1})
    with pytest.raises(GenerationError, match=f"kv_cache.{field} is {kv[field] + 1}, but the graph"):
        load(art)  # at load, not mid-generation
    assert_one_line_error(run_kiln("run", str(art), "-p", "hi", "-n", "2"), f"kv_cache.{field}",
                          "does not describe this graph")


def test_kv_dtype_that_disagrees_with_the_graph(llm, tmp_path):
    art = copy_artifact(llm, tmp_path / "a")
    edit_manifest(art, kv_cache={**_manifest(art)["kv_cache"], "dtype": "float16"})
    with pytest.raises(GenerationError, match="kv_cache.dtype is float16, but the graph's cache input"):
        load(art)


def test_declared_size_of_2_to_the_40(llm, tmp_path):
    art = copy_artifact(llm, tmp_path / "a")
    # A static cache's graph takes cache_position (the runtime checks the graph's inputs at load):
    # declared here, unused, so that what is tested is the size the manifest declares.
    import onnx
    from artifact_edits import refresh_files

    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    model.graph.input.append(onnx.helper.make_tensor_value_info("cache_position", onnx.TensorProto.INT64, ["sequence"]))
    onnx.save(model, str(art / "model.onnx"))
    edit_manifest(art, kv_cache={**_manifest(art)["kv_cache"], "static": True, "max_length": 2**40})
    refresh_files(art)
    proc = run_kiln("run", str(art), "-p", "hi", "-n", "2")
    assert_one_line_error(proc, "the cache the manifest declares", "1099511627776 slots", "more than can be allocated")



# --- a manifest does not size the runtime's thread pool -------------------------------------------

def test_a_manifest_asking_for_a_million_threads_runs_on_this_hosts_cores(llm, tmp_path):
    from kiln.manifest import host_cores, session_threads

    art = copy_artifact(llm, tmp_path / "a")
    manifest = _manifest(art)
    manifest["backend"]["session"]["intra_op_num_threads"] = 10 ** 6  # found by the manifest fuzzer: a hang
    _write(art, manifest)
    assert session_threads(manifest["backend"]["session"]) == host_cores()
    assert session_threads({"intra_op_num_threads": 1}) == 1 and session_threads({}) == 0
    proc = run_kiln("run", str(art), "--prompt", "hello", "-n", "2", "--no-check", "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) == 2

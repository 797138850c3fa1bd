"""Fuzzing the three input formats kiln reads (issue 29, deliverable 5), with Hypothesis.

- recipes (TOML): generated documents (known and unknown keys, pass names and parameters, values
  of every TOML type) and byte-mutated presets, fed to `load_recipe` (what `kiln compile -r`
  runs first), and a few through `kiln compile` itself;
- manifests (JSON): a real tiny-llama artifact's kiln.json with values replaced (wrong types,
  huge and negative numbers, paths, templates), keys deleted, fed to `kiln run` and `kiln inspect`;
- ONNX files: protobuf mutations of tiny-llama's export (bit flips, truncation, field changes
  through onnx's protobuf API), fed to `kiln compile FILE.onnx` and, as an artifact's model.onnx,
  to `kiln run`.

Every case must end in success or one `error: ...` line: never `internal error`, never a
traceback, never a hang (each case has a time limit). The CLI runs in-process (`kiln.cli.main`),
as a user's command line would. The fast tier runs FAST cases per format (derandomized, so a run
is reproducible); the slow tier SLOW cases each with a fresh seed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import onnx
import pytest
from artifact_edits import refresh_files

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kiln.errors import KilnError  # noqa: E402
from kiln.recipes import load_recipe, presets  # noqa: E402

FAST = int(os.environ.get("KILN_FUZZ_FAST", "50"))
SLOW = int(os.environ.get("KILN_FUZZ_SLOW", "2000"))
CASE_SECONDS = 30  # per case: a hang fails the test


def tier(examples: int, derandomize: bool):
    return settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


FAST_TIER = tier(FAST, True)
SLOW_TIER = tier(SLOW, False)


# --- running the CLI in-process ---------------------------------------------------------------

class Hang(BaseException):
    """Raised by the per-case alarm (a BaseException, so no `except Exception` swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: int, what: str):
    def on_alarm(signum, frame):
        raise Hang(f"{what}: still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def kiln(*args: str, seconds: int = CASE_SECONDS) -> tuple[int, str, str]:
    """`kiln ARGS` in this process: (exit code, stdout, stderr)."""
    from kiln.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, sigterm = sys.argv, signal.getsignal(signal.SIGTERM)
    sys.argv = ["kiln", *args]
    code = 0
    try:
        with time_limit(seconds, f"kiln {' '.join(args)}"), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    except Hang as exc:  # an ordinary failure from here on, so that Hypothesis shrinks the case
        raise AssertionError(f"hang: {exc}") from None
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, sigterm)
    return code, out.getvalue(), err.getvalue()


def assert_clean(result: tuple[int, str, str], case: str) -> None:
    """Success, or one `error: ...` line that is not an internal error; no traceback either way."""
    code, stdout, stderr = result
    assert "Traceback" not in stdout + stderr, f"{case}\n{stderr}"
    assert "internal error" not in stderr, f"{case}\n{stderr}"
    if code != 0:
        errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and stderr.rstrip().splitlines()[-1] == errors[0], f"{case}: exit {code}\n{stderr}"
        assert len(errors[0]) > len("error: "), f"{case}: an empty error line"


# --- recipes ----------------------------------------------------------------------------------

def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "-_" for c in key) and key.isascii() else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def to_toml(doc: dict) -> str:
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in doc.items() if k != "passes"]
    passes = doc.get("passes")
    if isinstance(passes, list) and all(isinstance(p, dict) for p in passes) and passes:
        for entry in passes:
            lines.append("[[passes]]")
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in entry.items())
    elif "passes" in doc:
        lines.append(f"passes = {_toml_value(passes)}")
    return "\n".join(lines) + "\n"


def _pass_names() -> dict[str, list[str]]:
    from kiln.passes.registry import available_passes

    return {name: cls.parameter_names() for name, cls in available_passes().items()}


PASSES = _pass_names()
PARAMS = sorted({p for ps in PASSES.values() for p in ps})
TEXT = st.text(max_size=12)
SCALARS = st.one_of(
    st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.sampled_from([0, 1, -1, 2, 4, 8, 16, 4096]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, 1e-9, 99.99, 1e300]),
    TEXT, st.sampled_from(["fp32", "int4", "../fp32.toml", "/etc/passwd", "qnn-htp", "kl", "gptq", "rtn", "energy"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(TEXT, inner, max_size=3)), max_leaves=6)


@st.composite
def recipe_documents(draw) -> str:
    doc: dict = {}
    for key in draw(st.lists(st.sampled_from(["name", "description", "base", "lower", "calibration_windows", "junk"]),
                             unique=True, max_size=5)):
        doc[key] = draw(st.one_of(VALUES, st.sampled_from(["fp32", "int8", "none"])) if key == "base" else VALUES)
    if draw(st.integers(0, 9)) == 0:
        doc["passes"] = draw(VALUES)
    else:
        entries = []
        for _ in range(draw(st.integers(0, 4))):
            name = draw(st.one_of(st.sampled_from(sorted(PASSES)), TEXT, VALUES))
            entry = {"name": name} if draw(st.integers(0, 9)) else {}
            known = PASSES.get(name, []) if isinstance(name, str) else []
            for param in draw(st.lists(st.sampled_from(known + PARAMS + ["zzz"]), unique=True, max_size=3)):
                entry[param] = draw(VALUES)
            entries.append(entry)
        doc["passes"] = entries
    return to_toml(doc)


PRESET_TEXTS = [p.read_bytes() for p in presets().values()]


@st.composite
def mutated_presets(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(PRESET_TEXTS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "line"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif kind == "insert":
            data[at:at] = draw(st.one_of(st.binary(min_size=1, max_size=8),
                                         st.sampled_from([b"=", b"[", b"]]", b'"', b"\n", b"[[passes]]\n", b"-1", b"nan",
                                                          b"\xff", b"\xc3", b"base = \"fp32\"\n"])))
        elif kind == "truncate":
            del data[at:]
        else:
            lines = bytes(data).split(b"\n")
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[j])
            data = bytearray(b"\n".join(lines))
    return bytes(data)


def check_recipe(tmp: Path, raw: bytes) -> str:
    path = tmp / "fuzz.toml"
    path.write_bytes(raw)
    try:
        with time_limit(CASE_SECONDS, "load_recipe"):
            load_recipe(str(path))
        return "ok"
    except KilnError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip(), f"{raw!r}: {message!r}"
        return "error"
    # anything else propagates: Hypothesis shrinks it and reports the document


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recipes")


def _recipes(recipe_dir, data) -> None:
    raw = data.draw(st.one_of(recipe_documents().map(str.encode), mutated_presets()), label="recipe")
    check_recipe(recipe_dir, raw)


@FAST_TIER
@given(data=st.data())
def test_fuzz_recipes(recipe_dir, data):
    _recipes(recipe_dir, data)


@pytest.mark.slow
@SLOW_TIER
@given(data=st.data())
def test_fuzz_recipes_slow(recipe_dir, data):
    _recipes(recipe_dir, data)


@settings(max_examples=5, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_recipes_through_compile(recipe_dir, tmp_path_factory, data):
    """A few generated recipes through `kiln compile` (the ones that load compile tiny-llama)."""
    raw = data.draw(st.one_of(recipe_documents().map(str.encode), mutated_presets()), label="recipe")
    path = recipe_dir / "cli.toml"
    path.write_bytes(raw)
    out = tmp_path_factory.mktemp("out") / "a"
    assert_clean(kiln("compile", "tiny-llama", "-r", str(path), "-o", str(out), seconds=120), repr(raw))


# --- manifests --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(tmp_path_factory, prepared) -> Path:
    import kiln as kiln_package

    prepared("tiny-llama")
    return kiln_package.compile("tiny-llama", tmp_path_factory.mktemp("llm") / "a", recipe="fp32", progress=False).path


def _paths(value, prefix=()):
    """Every (path, value) of a JSON tree, containers included."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 3, 2**31, 2**40, 2**63, -(2**63), 10**30]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.5, -0.5, 1e308, 1e-308]),
    st.text(max_size=10),
    st.sampled_from(["", "model.onnx", "../model.onnx", "/etc/passwd", "tokenizer.json", "kiln.json", ".",
                     "model.onnx.data", "past_key_values.{layer}.{key|value}", "present.{layer}.{key|value}",
                     "{layer}", "{key|value}", "logits", "input_ids", "float16", "bfloat16", "int8", "cpu",
                     "CUDAExecutionProvider", "CPUExecutionProvider", "all", "disable", "causal-lm", "embedding",
                     "sequence-classification", "1.0", "1.9", "2.0", "{{ 1/0 }}", "{% for %}"]),
)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=5)


RUNTIME_FIELDS = ("task", "backend", "io", "tokenizer", "kv_cache", "generation", "files",
                  "classification", "embedding", "target")


def same_type(old) -> st.SearchStrategy:
    if isinstance(old, bool):
        return st.just(not old)
    if isinstance(old, int):
        return st.one_of(st.sampled_from([0, 1, -1, old + 1, old - 1, old * 2, 2**31, 2**40, 2**63]),
                         st.integers(min_value=-(2**64), max_value=2**64))
    if isinstance(old, float):
        return st.floats(allow_nan=False, allow_infinity=False)
    if isinstance(old, str):
        return st.one_of(JSON_SCALARS.filter(lambda v: isinstance(v, str)), st.just(old + "x"), st.just(old[:-1]),
                         st.just(old.upper()))
    if isinstance(old, list):
        return st.one_of(st.just(old[:-1]), st.just(old[1:]), st.just([]), st.just(old + old[-1:]),
                         st.just(list(reversed(old))))
    if isinstance(old, dict):
        return st.just({})
    return JSON_VALUES


def mutate_manifest(data, manifest: dict) -> dict:
    manifest = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = [p for p, _ in _paths(manifest) if p]
        # Mostly what a runtime reads (the recorded passes and source details are informational).
        hot = [p for p in paths if p[0] in RUNTIME_FIELDS]
        if hot and data.draw(st.integers(0, 3), label="hot?"):
            paths = hot
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        parent = manifest
        for part in path[:-1]:
            parent = parent[part]
        kind = data.draw(st.sampled_from(["same-type", "same-type", "replace", "delete", "scale"]), label="kind")
        old = parent[path[-1]]
        if kind == "same-type":  # a value the schema may well accept: what the runtime then makes of it
            parent[path[-1]] = data.draw(same_type(old), label="value")
        elif kind == "delete":
            del parent[path[-1]]
        elif kind == "scale" and isinstance(old, (int, float)) and not isinstance(old, bool):
            parent[path[-1]] = old * data.draw(st.sampled_from([-1, 0, 2, 1000, 2**40]), label="factor")
        else:
            parent[path[-1]] = data.draw(JSON_VALUES, label="value")
    return manifest


def _manifest_case(llm: Path, work: Path, data) -> None:
    manifest = json.loads((llm / "kiln.json").read_text())
    mutated = mutate_manifest(data, manifest)
    (work / "kiln.json").write_text(json.dumps(mutated, indent=1))
    command = data.draw(st.sampled_from(["run", "run", "inspect"]), label="command")
    args = (["run", str(work), "--prompt", "hello", "-n", "2", "--no-check"] if command == "run" else
            ["inspect", str(work), "--json", "--bandwidth", "10", "--flops", "10"])
    assert_clean(kiln(*args), f"kiln {command} on manifest {json.dumps(mutated)[:2000]}")


@pytest.fixture(scope="module")
def manifest_work(llm, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("manifest") / "a"
    shutil.copytree(llm, work)
    return work


@FAST_TIER
@given(data=st.data())
def test_fuzz_manifests(llm, manifest_work, data):
    _manifest_case(llm, manifest_work, data)


@pytest.mark.slow
@SLOW_TIER
@given(data=st.data())
def test_fuzz_manifests_slow(llm, manifest_work, data):
    _manifest_case(llm, manifest_work, data)


# --- ONNX files -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_source(prepared, tmp_path_factory) -> tuple[bytes, Path]:
    """tiny-llama's export as one self-contained file (weights inside), with its tokenizer."""
    export = Path(prepared("tiny-llama").path)
    model = onnx.load(str(export))  # external data loaded
    folder = tmp_path_factory.mktemp("onnx")
    shutil.copy(export.parent / "tokenizer.json", folder / "tokenizer.json")
    return model.SerializeToString(), folder


def _proto_mutation(data, model: onnx.ModelProto) -> None:
    graph = model.graph
    kind = data.draw(st.sampled_from(["opset", "ir_version", "op_type", "domain", "input_name", "drop_node",
                                      "attribute", "initializer_dims", "initializer_dtype", "initializer_raw",
                                      "value_dims", "value_dtype", "drop_input", "drop_output", "duplicate_node",
                                      "rename_output"]), label="field")
    nodes = list(graph.node)
    node = nodes[data.draw(st.integers(0, len(nodes) - 1), label="node")] if nodes else None
    if kind == "opset":
        model.opset_import[0].version = data.draw(st.sampled_from([0, 1, 7, 13, 17, 25, 99, 2**31 - 1]))
    elif kind == "ir_version":
        model.ir_version = data.draw(st.sampled_from([0, 1, 3, 7, 11, 99, 2**62]))
    elif kind == "op_type" and node is not None:
        node.op_type = data.draw(st.sampled_from(["Add", "MatMul", "Relu", "Gather", "Attention", "NoSuchOp", ""]))
    elif kind == "domain" and node is not None:
        node.domain = data.draw(st.sampled_from(["com.microsoft", "ai.onnx.ml", "nowhere", "pkg.onnxscript.torch_lib"]))
    elif kind == "input_name" and node is not None and node.input:
        node.input[data.draw(st.integers(0, len(node.input) - 1))] = data.draw(
            st.sampled_from(["", "input_ids", "nothing", *(v.name for v in graph.output[:1])]))
    elif kind == "drop_node" and node is not None:
        graph.node.remove(node)
    elif kind == "duplicate_node" and node is not None:
        graph.node.append(copy.deepcopy(node))
    elif kind == "attribute" and node is not None and node.attribute:
        attr = node.attribute[data.draw(st.integers(0, len(node.attribute) - 1))]
        if attr.type == onnx.AttributeProto.INT:
            attr.i = data.draw(st.sampled_from([-(2**63), -1, 0, 1, 2**40]))
        elif attr.type == onnx.AttributeProto.INTS and attr.ints:
            attr.ints[0] = data.draw(st.sampled_from([-(2**63), -1, 0, 2**40]))
        elif attr.type == onnx.AttributeProto.FLOAT:
            attr.f = data.draw(st.sampled_from([float("nan"), float("inf"), -1.0, 0.0]))
        else:
            attr.type = data.draw(st.sampled_from([0, 1, 2, 3, 7, 11]))  # valid enumerators, mostly wrong ones
    elif kind.startswith("initializer") and graph.initializer:
        init = graph.initializer[data.draw(st.integers(0, len(graph.initializer) - 1))]
        if kind == "initializer_dims":
            if init.dims:
                init.dims[data.draw(st.integers(0, len(init.dims) - 1))] = data.draw(
                    st.sampled_from([-1, 0, 1, 3, 2**40]))
            else:
                init.dims.append(data.draw(st.sampled_from([0, 2, 2**40])))
        elif kind == "initializer_dtype":
            init.data_type = data.draw(st.sampled_from([0, 1, 2, 6, 7, 9, 10, 16, 17, 23, 99]))
        else:
            init.raw_data = init.raw_data[: data.draw(st.integers(0, len(init.raw_data)))]
    elif kind.startswith("value") and graph.input:
        value = data.draw(st.sampled_from([*graph.input, *graph.output]))
        tensor = value.type.tensor_type
        if kind == "value_dtype":
            tensor.elem_type = data.draw(st.sampled_from([0, 1, 6, 7, 10, 99]))
        elif tensor.shape.dim:
            dim = tensor.shape.dim[data.draw(st.integers(0, len(tensor.shape.dim) - 1))]
            choice = data.draw(st.sampled_from([-1, 0, 1, 2**40, "S", ""]))
            if isinstance(choice, int):
                dim.dim_value = choice
            else:
                dim.dim_param = choice
    elif kind == "drop_input" and graph.input:
        graph.input.pop(data.draw(st.integers(0, len(graph.input) - 1)))
    elif kind == "drop_output" and graph.output:
        graph.output.pop(data.draw(st.integers(0, len(graph.output) - 1)))
    elif kind == "rename_output" and graph.output:
        graph.output[0].name = data.draw(st.sampled_from(["logits", "last_hidden_state", "embedding", "x", ""]))


def mutate_onnx(data, raw: bytes, parse) -> bytes:
    """Byte-level (bit flips, truncation, splices) or field-level (through onnx's protobuf API)."""
    if data.draw(st.booleans(), label="bytes?"):
        out = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 6), label="edits")):
            kind = data.draw(st.sampled_from(["flip", "flip", "truncate", "zero", "splice"]), label="edit")
            at = data.draw(st.integers(0, len(out) - 1), label="at") if out else 0
            if kind == "flip" and out:
                out[at] ^= 1 << data.draw(st.integers(0, 7))
            elif kind == "truncate":
                del out[at:]
            elif kind == "zero":
                out[at:at + 64] = bytes(len(out[at:at + 64]))
            else:
                out[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        return bytes(out)
    model = parse(raw)
    for _ in range(data.draw(st.integers(1, 3), label="fields")):
        _proto_mutation(data, model)
    return model.SerializeToString()


def _parse_full(raw: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.ParseFromString(raw)
    return model


def _onnx_compile_case(onnx_source, tmp_path_factory, data) -> None:
    raw, folder = onnx_source
    mutated = mutate_onnx(data, raw, _parse_full)
    path = folder / "model.onnx"
    path.write_bytes(mutated)
    out = folder / "out"
    shutil.rmtree(out, ignore_errors=True)
    assert_clean(kiln("compile", str(path), "-o", str(out), "-r", "none", "--force"), "kiln compile mutated.onnx")


@pytest.fixture(scope="module")
def run_work(llm, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("onnxrun") / "a"
    shutil.copytree(llm, work)
    return work


def _onnx_run_case(llm, run_work, data) -> None:
    raw = (llm / "model.onnx").read_bytes()
    (run_work / "model.onnx").write_bytes(mutate_onnx(data, raw, _parse_full))
    refresh_files(run_work)  # the files record matches: what is tested is the graph, not the size check
    assert_clean(kiln("run", str(run_work), "--prompt", "hello", "-n", "2", "--no-check"), "kiln run, mutated model.onnx")


@FAST_TIER
@given(data=st.data())
def test_fuzz_onnx(onnx_source, tmp_path_factory, llm, run_work, data):
    if data.draw(st.booleans(), label="compile?"):
        _onnx_compile_case(onnx_source, tmp_path_factory, data)
    else:
        _onnx_run_case(llm, run_work, data)


@pytest.mark.slow
@SLOW_TIER
@given(data=st.data())
def test_fuzz_onnx_slow(onnx_source, tmp_path_factory, llm, run_work, data):
    if data.draw(st.booleans(), label="compile?"):
        _onnx_compile_case(onnx_source, tmp_path_factory, data)
    else:
        _onnx_run_case(llm, run_work, data)


# --- what the fuzzers found, one regression test each ----------------------------------------

def _edited(llm: Path, tmp_path: Path, **kv) -> Path:
    work = tmp_path / "a"
    shutil.copytree(llm, work)
    manifest = json.loads((work / "kiln.json").read_text())
    for key, value in kv.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (work / "kiln.json").write_text(json.dumps(manifest))
    return work


def _one_line(result, *fragments):
    code, _, stderr = result
    assert code == 1 and "internal error" not in stderr, stderr
    line = stderr.strip()
    assert "\n" not in line and line.startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in line, line


def test_found_causal_lm_manifest_without_kv_cache(llm, tmp_path):
    """Was: internal error: ValueError: Required inputs ([...]) are missing from input feed (['input_ids'])."""
    work = _edited(llm, tmp_path, kv_cache=None)
    _one_line(kiln("run", str(work), "--prompt", "hello", "-n", "2", "--no-check"),
              "the graph takes an input 'attention_mask' that the manifest does not account for",
              "the manifest has no kv_cache")


def test_found_kv_cache_num_layers_of_2_to_the_40(llm, tmp_path):
    """Was: a hang (2^41 cache names made before any check)."""
    manifest = json.loads((llm / "kiln.json").read_text())
    for layers in (2**40, 64):
        work = _edited(llm, tmp_path / str(layers), kv_cache={**manifest["kv_cache"], "num_layers": layers})
        _one_line(kiln("run", str(work), "--prompt", "hello", "-n", "2", "--no-check", seconds=20),
                  f"kv_cache.num_layers is {layers}, but the graph has")


def _without_outputs(onnx_source) -> Path:
    raw, folder = onnx_source
    model = _parse_full(raw)
    del model.graph.output[:]
    path = folder / "no-outputs.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("task", [None, "causal-lm"])
def test_found_onnx_without_outputs(onnx_source, tmp_path, task):
    """Was: internal error: IndexError: list index out of range (the task read from outputs[0])."""
    path = _without_outputs(onnx_source)
    _one_line(kiln("compile", str(path), "-o", str(tmp_path / "out"), "-r", "none", *(["--task", task] if task else [])),
              "no-outputs.onnx: the ONNX graph has no outputs")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["compile", "inspect"])
def test_found_onnx_that_does_not_parse(onnx_source, tmp_path, command):
    """Was: internal error: ModelLoadError: ... not a valid ONNX model (Wire format was corrupt)."""
    raw, _ = onnx_source
    path = tmp_path / "zeroed.onnx"
    path.write_bytes(bytes(64) + raw[64:])
    args = ["-o", str(tmp_path / "out"), "-r", "none"] if command == "compile" else []
    _one_line(kiln(command, str(path), *args), "zeroed.onnx: not a valid ONNX model")


@pytest.mark.parametrize("size,fragment", [(-1, "declares size -1 on axis 0: a size must be >= 0"),
                                           (0, "declares size 0 on axis 0: an empty input cannot be fed"),
                                           (2**40, "declares size 1099511627776 on axis 0: more than kiln can feed")])
def test_found_onnx_input_with_a_bad_declared_size(onnx_source, tmp_path, size, fragment):
    """Was: internal error: ValueError: negative dimensions are not allowed (sample inputs), and for 0:
    ValueError: zero-size array to reduction operation minimum which has no identity."""
    raw, folder = onnx_source
    model = _parse_full(raw)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = size
    path = folder / "bad-size.onnx"
    path.write_bytes(model.SerializeToString())
    _one_line(kiln("compile", str(path), "-o", str(tmp_path / "out"), "-r", "none"),
              "bad-size.onnx: the graph's input 'input_ids'", fragment)


def test_found_graph_that_fails_at_run_time(llm, tmp_path):
    """Was: internal error: RuntimeError: Error in execution: ... Range node 'kiln_query_slots' ..."""
    work = tmp_path / "a"
    shutil.copytree(llm, work)
    model = onnx.load(str(work / "model.onnx"), load_external_data=False)
    # The fuzzer's case: the first node's first integer attribute set to -2^63 (a Shape's `start`,
    # so a Range downstream gets a 2-element start). ORT loads the graph and fails when it runs.
    node = model.graph.node[0]
    attr = next(a for a in node.attribute if a.type == onnx.AttributeProto.INT)
    attr.i = -(2**63)
    onnx.save(model, str(work / "model.onnx"))
    refresh_files(work)
    _one_line(kiln("run", str(work), "--prompt", "hello", "-n", "2", "--no-check"),
              "the model: the graph failed to run (", "the artifact is damaged or does not match its manifest")


@pytest.mark.parametrize("elem_type", [0, 99])
def test_found_onnx_input_without_a_dtype(onnx_source, tmp_path, elem_type):
    """Was: internal error: TypeError: Numpy does not support ONNX data type: UNDEFINED (sample inputs)."""
    raw, folder = onnx_source
    model = _parse_full(raw)
    model.graph.input[0].type.tensor_type.elem_type = elem_type
    path = folder / "no-dtype.onnx"
    path.write_bytes(model.SerializeToString())
    result = kiln("compile", str(path), "-o", str(tmp_path / "out"), "-r", "none")
    assert_clean(result, "input_ids without a dtype")
    assert result[0] == 1

"""kiln.json versioning and its JSON Schema (kiln/manifest.schema.json, documented in docs/manifest.md)."""

import copy
import json

import pytest

from kiln.manifest import (
    SCHEMA_PATH,
    SCHEMA_VERSION,
    ManifestError,
    check_manifest,
    read_manifest,
)

LLM = {
    "schema_version": SCHEMA_VERSION,
    "task": "causal-lm",
    "backend": {"name": "ort", "model": "model.onnx", "session": {"providers": ["CPUExecutionProvider"],
                                                                  "intra_op_num_threads": 2, "graph_optimization_level": "all"}},
    "io": {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
           "outputs": [{"name": "logits", "dtype": "float", "shape": ["batch", "sequence", 320]}]},
    "tokenizer": "tokenizer.json",
    "generation": {"eos_token_ids": [2], "bos_token_id": None, "pad_token_id": 2},
    "kv_cache": {"num_layers": 2, "sequence_axis": 2, "kv_heads": 2, "head_dim": 16, "value_head_dim": 16, "dtype": "float",
                 "past": "past_key_values.{layer}.{key|value}", "present": "present.{layer}.{key|value}", "static": False},
}


def changed(edit) -> dict:
    manifest = copy.deepcopy(LLM)
    edit(manifest)
    return manifest


def test_schema_file_is_valid_draft_2020_12():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("version", ["2.0", "0.9", "10.1"])
def test_unknown_major_version_is_refused_first(tmp_path, version):
    (tmp_path / "kiln.json").write_text(json.dumps({"schema_version": version}))  # nothing else: refused before validation
    with pytest.raises(ManifestError, match=rf"manifest schema version {version} is not supported \(this kiln reads 1\.x\)"):
        read_manifest(tmp_path)


def test_missing_or_mistyped_version():
    with pytest.raises(ManifestError, match="schema_version is missing"):
        check_manifest(changed(lambda m: m.pop("schema_version")))
    with pytest.raises(ManifestError, match="schema_version is not a string"):
        check_manifest(changed(lambda m: m.update(schema_version=1.0)))


def test_newer_minor_version_with_new_fields_is_accepted():
    check_manifest(changed(lambda m: m.update(schema_version="1.7", something_new={"x": 1})))
    check_manifest(changed(lambda m: m["kv_cache"].update(new_hint=True)))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["kv_cache"].update(num_layers="two"), "kv_cache.num_layers: 'two' is not of type 'integer'"),
    (lambda m: m["kv_cache"].pop("head_dim"), "kv_cache.head_dim is missing"),
    (lambda m: m["kv_cache"].update(static=True), "kv_cache.max_length is missing"),
    (lambda m: m["kv_cache"].update(dtype="int8"), "kv_cache.dtype: 'int8' is not one of"),
    (lambda m: m["kv_cache"].update(past="past_key_values"), "kv_cache.past: 'past_key_values' does not match"),
    (lambda m: m.pop("generation"), "generation is missing"),
    (lambda m: m["io"]["inputs"][0].pop("dtype"), "io.inputs[0].dtype is missing"),
    (lambda m: m["generation"].update(eos_token_ids=[-1]), "generation.eos_token_ids[0]: -1 is less than the minimum of 0"),
    (lambda m: m.update(task="embedding"), "embedding is missing"),
    (lambda m: m["backend"]["session"].update(graph_optimization_level="max"), "backend.session.graph_optimization_level"),
])
def test_schema_violations_name_the_field(tmp_path, edit, message):
    pytest.importorskip("jsonschema")
    (tmp_path / "kiln.json").write_text(json.dumps(changed(edit)))
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    text = str(info.value)
    assert "\n" not in text and "invalid manifest: " in text and message in text, text

"""The Node.js runtime (examples/node) drives kiln artifacts from kiln.json alone and agrees
with the Python runtime: same greedy tokens (KV cache dynamic and static, and no cache),
same embeddings, same tokenization, and the same refusal of an unknown manifest version.

Needs `node` and `npm` (installs examples/node with `npm ci` from its lockfile into a
temporary copy); skipped only when `node` is not on PATH."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from artifact_edits import copy_artifact, rename_cache
from conftest import REPO, run_kiln

import kiln
from kiln.manifest import SCHEMA_PATH, ManifestError

NODE = shutil.which("node")
NPM = shutil.which("npm")
EXAMPLE = REPO / "examples" / "node"

pytestmark = [pytest.mark.slow,  # npm ci, a node process per check
              pytest.mark.skipif(NODE is None, reason="node is not on PATH (the Node.js runtime needs Node 20+)")]

PROMPTS = ["Hello, world", "The quick brown fox jumps", "¿Dónde está? 日本語 😀"]
SENTENCES = [
    "hello world",
    "The cat sat on the mat.",
    "¿Dónde está la biblioteca? 日本語のテキスト 😀",
    "short",
    # longer than the encoder's 256-token limit: truncation must match too
    " ".join(["Quantum chromodynamics describes the strong interaction between quarks and gluons."] * 30),
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def node_pkg(tmp_path_factory) -> Path:
    """examples/node installed with `npm ci` (its committed lockfile) in a fresh copy."""
    assert NPM is not None, "node is on PATH but npm is not"
    dest = tmp_path_factory.mktemp("node") / "kiln-node"
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("node_modules"))
    # onnxruntime-node bundles the CPU binaries; its install script would fetch CUDA ones.
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
    proc = subprocess.run([NPM, "ci", "--no-audit", "--no-fund", "--prefer-offline"], cwd=dest, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dest


def node(pkg: Path, script: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    # Validate against the very schema file Python validates against.
    env = {**os.environ, "KILN_MANIFEST_SCHEMA": str(SCHEMA_PATH)}
    return subprocess.run([NODE, str(pkg / script), *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=300, check=False)


def node_json(pkg: Path, script: str, *args: str, stdin: str | None = None):
    proc = node(pkg, script, *args, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _compile(tmp_path_factory, prepared, name: str, recipe_text: str | None = None) -> Path:
    prepared(name)
    base = tmp_path_factory.mktemp(name)
    recipe = None
    if recipe_text is not None:
        recipe = base / "recipe.toml"
        recipe.write_text(recipe_text)
    return kiln.compile(name, base / "a", recipe=recipe, progress=False).path


CLEANUP = "\n".join(f'[[passes]]\nname = "{n}"' for n in ["fold-constants", "simplify", "eliminate-common-subexpressions"])


VARIANTS = {
    "dynamic": None,  # the default recipe: a growing cache, fused GQA
    "static": CLEANUP + '\n[[passes]]\nname = "insert-kv-cache"\nstatic_length = 64\n',
    "no-cache": CLEANUP + "\n",
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, prepared):
    """tiny-llama compiled with one of VARIANTS' recipes (each compiled once)."""
    done: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in done:
            path = _compile(tmp_path_factory, prepared, "tiny-llama", VARIANTS[variant])
            manifest = json.loads((path / "kiln.json").read_text())
            assert ("kv_cache" in manifest) == (variant != "no-cache")
            assert manifest.get("kv_cache", {}).get("static", False) == (variant == "static")
            done[variant] = path
        return done[variant]

    return get


@pytest.fixture(params=list(VARIANTS))
def llm(request, tiny_llama) -> Path:
    return tiny_llama(request.param)


@pytest.fixture
def tiny(tiny_llama) -> Path:
    return tiny_llama("dynamic")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory, prepared) -> Path:
    return _compile(tmp_path_factory, prepared, "minilm-l6")


def test_greedy_tokens_match_python(node_pkg, llm):
    art = kiln.load(llm)
    for prompt in PROMPTS:
        want = art.generate(prompt, NEW_TOKENS)
        got = node_json(node_pkg, "generate.js", str(llm), prompt, "--max-new-tokens", str(NEW_TOKENS), "--json")
        assert got["prompt_ids"] == want.prompt_ids, prompt
        assert got["token_ids"] == want.token_ids, prompt
        assert got["stop_reason"] == want.stop_reason


@pytest.mark.parametrize("variant", ["dynamic", "static"])
def test_renamed_cache_is_driven_from_the_manifest_templates(node_pkg, tiny_llama, tmp_path, variant):
    """Cache inputs and outputs renamed in the graph, the manifest's past/present templates changed
    to match: Node and Python both take the names from the templates and give the same tokens."""
    original = tiny_llama(variant)
    renamed = copy_artifact(original, tmp_path / "renamed")
    rename_cache(renamed)
    want = kiln.load(original)
    for prompt in PROMPTS[:2]:
        tokens = want.generate(prompt, NEW_TOKENS).token_ids
        assert kiln.load(renamed).generate(prompt, NEW_TOKENS).token_ids == tokens
        got = node_json(node_pkg, "generate.js", str(renamed), prompt, "--max-new-tokens", str(NEW_TOKENS), "--json")
        assert got["token_ids"] == tokens, prompt


def test_streamed_text_matches_kiln_run(node_pkg, tiny):
    ours = node(node_pkg, "generate.js", str(tiny), PROMPTS[0], "-n", "12")
    theirs = run_kiln("run", str(tiny), "--prompt", PROMPTS[0], "-n", "12")
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr
    assert ours.stdout == theirs.stdout


def test_tokenization_matches_python(node_pkg, tiny, minilm):
    texts = PROMPTS + SENTENCES + ["tabs\tand\nnewlines", "\u00a0nbsp e\u0301", "<|endoftext|>[CLS]", "\x00 nul"]
    for path in (tiny, minilm):
        art = kiln.load(path)
        # encoder: kiln's own feeds for the text alone (truncated, special tokens, no padding)
        want = [art.encode(t) if art.task == "causal-lm" else art.tokenize_batch([t])["input_ids"][0].tolist()
                for t in texts]
        got = node_json(node_pkg, "tokenize.js", str(path), "-", stdin=json.dumps(texts))["ids"]
        assert got == want, path


def test_embeddings_match_python(node_pkg, minilm):
    art = kiln.load(minilm)
    want = art.embed(SENTENCES)
    got = np.array(node_json(node_pkg, "embed.js", str(minilm), *SENTENCES, "--json")["embedding"], dtype=np.float64)
    assert got.shape == want.shape == (len(SENTENCES), 384)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, cos
    # one sentence alone (no padding in its batch) is the same vector
    alone = np.array(node_json(node_pkg, "embed.js", str(minilm), SENTENCES[3], "--json")["embedding"])
    assert float(alone @ want[3] / np.linalg.norm(alone) / np.linalg.norm(want[3])) >= 0.9999


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr and " at " not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_unknown_major_version_is_refused_by_both(node_pkg, tiny, tmp_path):
    # a real artifact whose manifest claims major version 2: refused before anything else is read
    art = tmp_path / "future"
    shutil.copytree(tiny, art)
    manifest = json.loads((art / "kiln.json").read_text())
    (art / "kiln.json").write_text(json.dumps({**manifest, "schema_version": "2.0"}))
    message = "manifest schema version 2.0 is not supported"
    assert_one_line_error(node(node_pkg, "generate.js", str(art), "Hi"), message)
    assert_one_line_error(node(node_pkg, "embed.js", str(art), "Hi"), message)
    with pytest.raises(ManifestError, match=message):  # `kiln run`: tests/kiln/test_cli_errors.py
        kiln.load(art)
    # a newer minor version with fields this reader does not know is accepted by both
    (art / "kiln.json").write_text(json.dumps({**manifest, "schema_version": "1.9", "added_in_1_9": {"x": 1}}))
    assert node(node_pkg, "generate.js", str(art), "Hi", "-n", "2").returncode == 0
    assert len(kiln.load(art).generate("Hi", 2).token_ids) == 2


def test_schema_violation_is_refused_by_both(node_pkg, tiny, tmp_path):
    art = tmp_path / "broken"
    shutil.copytree(tiny, art)
    manifest = json.loads((art / "kiln.json").read_text())
    manifest["io"]["inputs"][0].pop("dtype")
    (art / "kiln.json").write_text(json.dumps(manifest))
    message = "invalid manifest: io.inputs[0].dtype is missing"
    assert_one_line_error(node(node_pkg, "generate.js", str(art), "Hi"), message)
    pytest.importorskip("jsonschema")  # Python validates the schema with jsonschema
    with pytest.raises(ManifestError, match=re.escape(message)):
        kiln.load(art)


def test_wrong_task_and_usage_errors(node_pkg, minilm):
    assert_one_line_error(node(node_pkg, "generate.js", str(minilm), "Hi"), "does not generate text")
    assert_one_line_error(node(node_pkg, "generate.js", str(minilm)), "usage:")
    assert_one_line_error(node(node_pkg, "embed.js", "/no/such/dir", "Hi"), "no such artifact directory")


@pytest.mark.parametrize("field, value, fragment", [
    ("model", "/etc/passwd", "backend.model '/etc/passwd' is not a plain relative path"),
    ("model", "../other/model.onnx", "backend.model '../other/model.onnx' is not a plain relative path"),
    ("tokenizer", "../other/tokenizer.json", "tokenizer '../other/tokenizer.json' is not a plain relative path"),
    ("symlink", "model.onnx", "backend.model 'model.onnx' resolves outside the artifact directory"),
])
def test_paths_outside_the_artifact_are_refused_by_both(node_pkg, tiny, tmp_path, field, value, fragment):
    shutil.copytree(tiny, tmp_path / "other")
    art = tmp_path / "a"
    shutil.copytree(tiny, art)
    manifest = json.loads((art / "kiln.json").read_text())
    if field == "symlink":
        (art / "model.onnx").unlink()
        (art / "model.onnx").symlink_to(tmp_path / "other" / "model.onnx")
    elif field == "model":
        manifest["backend"]["model"] = value
    else:
        manifest["tokenizer"] = value
    (art / "kiln.json").write_text(json.dumps(manifest))
    assert_one_line_error(node(node_pkg, "generate.js", str(art), "Hi", "-n", "2"), fragment)
    with pytest.raises(ManifestError, match=re.escape(fragment)):
        kiln.load(art)


def test_file_sizes_are_checked_by_both(node_pkg, tiny, tmp_path):
    art = tmp_path / "a"
    shutil.copytree(tiny, art)
    data = art / "model.onnx.data"
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[:-100])
    message = f"file model.onnx.data has {size - 100} bytes, the manifest records {size}"
    assert_one_line_error(node(node_pkg, "generate.js", str(art), "Hi", "-n", "2"), message)
    with pytest.raises(ManifestError, match=message):
        kiln.load(art)
    data.unlink()
    assert_one_line_error(node(node_pkg, "generate.js", str(art), "Hi", "-n", "2"), "file model.onnx.data is missing")

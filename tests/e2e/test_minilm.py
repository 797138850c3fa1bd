"""Real model in CI: all-MiniLM-L6-v2 from its PyPI wheel, compiled and compared with PyTorch."""

import json

import numpy as np
import pytest

import kiln
from kiln.models import get_source
from kiln.reference import cosine, reference_embed
from conftest import run_kiln

pytestmark = pytest.mark.slow  # the MiniLM wheel and export

SENTENCES = [
    "hello world",
    "The cat sat on the mat.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "¿Dónde está la biblioteca?",
    "short",
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory, prepared):
    prepared("minilm-l6")
    out = tmp_path_factory.mktemp("minilm") / "A"
    proc = run_kiln("compile", "minilm-l6", "-o", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    return out


def test_embeddings_match_pytorch(minilm):
    art = kiln.load(minilm)
    vectors = art.embed(SENTENCES)
    assert vectors.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    ref = reference_embed(art.manifest, art.tokenize_batch(SENTENCES), loaded=get_source("minilm-l6").load())
    cos = cosine(vectors, ref)
    assert cos.min() >= 0.9999, cos
    # padding in a batch does not change a sentence's embedding
    alone = art.embed([SENTENCES[4]])
    assert cosine(alone, vectors[4:5])[0] >= 0.9999


def test_cli_run_prints_cosine(minilm):
    proc = run_kiln("run", str(minilm), "--text", "hello world", "--json")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert len(payload["embedding"]) == 384
    assert payload["cosine_vs_pytorch"][0] >= 0.9999
    text = run_kiln("run", str(minilm), "--text", "hello world")
    assert "cosine vs PyTorch: 1.0000" in text.stdout or "cosine vs PyTorch: 0.9999" in text.stdout


def test_inspect_shows_ops_params_dtypes_and_passes(minilm):
    proc = run_kiln("inspect", str(minilm), env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    for fragment in ["parameters 22,", "float", "MatMul", "fold-constants", "eliminate-dead-code", "max_rel"]:
        assert fragment in proc.stdout
    data = json.loads(run_kiln("inspect", str(minilm), "--json").stdout)
    assert data["summary"]["ops"]["MatMul"] >= 24  # Q/K/V packed into one per layer
    assert data["summary"]["ops"]["com.microsoft::MultiHeadAttention"] == 6
    assert data["passes"][0]["name"] == "fold-constants"

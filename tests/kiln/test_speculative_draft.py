"""A draft that kiln derives from the target and bundles in its artifact (`kiln compile --draft`,
kiln.draft): the manifest describes it, the runtime drafts with it by default, greedy tokens stay
those of plain decoding, and what is wrong is refused in one line."""

import json
import shutil

import pytest
from conftest import REPO, assert_nothing_left, assert_one_line_error, run_kiln
from speculative_prompts import PROMPTS

import kiln
from kiln.runtime.speculative import SpeculationError


pytestmark = pytest.mark.slow  # compiles a target and a bundled draft


@pytest.fixture(scope="module")
def bundled(tmp_path_factory, prepared):
    """tiny-llama fp32 with a draft of one of its two layers (the draft recipe, with `layers = 1`
    for `target_params`: 45% of tiny-llama's parameters is fewer than one layer)."""
    prepared("tiny-llama")
    root = tmp_path_factory.mktemp("bundled")
    recipe = root / "draft.toml"
    recipe.write_text((REPO / "kiln" / "recipes" / "draft.toml").read_text().replace("target_params = 0.45", "layers = 1"))
    kiln.compile("tiny-llama", root / "a", recipe="fp32", draft=True, draft_recipe=recipe, progress=False)
    return root / "a"


def test_the_manifest_describes_the_bundled_draft(bundled):
    manifest = json.loads((bundled / "kiln.json").read_text())
    draft = manifest["draft"]
    assert draft["path"] == "draft" and draft["recipe"] == "draft" and draft["layers"] == 1
    inner = json.loads((bundled / "draft" / "kiln.json").read_text())
    assert inner["kv_cache"]["num_layers"] == 1 and manifest["kv_cache"]["num_layers"] == 2
    assert draft["parameters"] == inner["summary"]["artifact"]["parameters"] < manifest["summary"]["artifact"]["parameters"]
    assert draft["bytes"] == sum(r["bytes"] for rel, r in manifest["files"].items() if rel.startswith("draft/"))
    assert "draft/kiln.json" in manifest["files"] and "draft/model.onnx" in manifest["files"]
    kiln.load(bundled, verify=True)  # every file, the draft's included, has its recorded sha256


def test_greedy_tokens_with_the_bundled_draft_equal_plain_decoding(bundled):
    art = kiln.load(bundled)
    spec = art.speculation("draft", adaptive=False, draft_tokens=4)
    runs = [art.generate(p, 128, speculative=spec) for p in PROMPTS]
    assert [g.token_ids for g in runs] == [art.generate(p, 128).token_ids for p in PROMPTS]
    proposed = sum(g.speculation["proposed"] for g in runs)
    accepted = sum(g.speculation["accepted"] for g in runs)
    assert 0 < accepted < proposed


def test_kiln_run_drafts_with_the_bundled_draft_by_default_when_it_agrees(bundled, tmp_path):
    assert 0 <= json.loads((bundled / "kiln.json").read_text())["draft"]["agreement"] <= 1
    plain = kiln.load(bundled).generate(PROMPTS[2], 32).token_ids
    for agreement, used in ((1.0, True), (0.1, False)):
        copy = tmp_path / f"a{agreement}"
        shutil.copytree(bundled, copy)
        manifest = json.loads((copy / "kiln.json").read_text())
        manifest["draft"]["agreement"] = agreement
        (copy / "kiln.json").write_text(json.dumps(manifest))
        by_default = json.loads(run_kiln("run", str(copy), "-p", PROMPTS[2], "-n", "32", "--json").stdout)
        assert by_default["token_ids"] == plain and ("speculation" in by_default) == used
        asked = json.loads(run_kiln("run", str(copy), "-p", PROMPTS[2], "-n", "32", "--json", "--speculative", "draft",
                                    "--draft-tokens", "1").stdout)
        assert asked["token_ids"] == plain and asked["speculation"]["proposed"] <= asked["speculation"]["target_forwards"]
    off = json.loads(run_kiln("run", str(copy), "-p", PROMPTS[2], "-n", "32", "--json", "--speculative", "none").stdout)
    assert off["token_ids"] == plain and "speculation" not in off


def test_draft_errors_are_one_line(bundled, tmp_path, prepared):
    plain = tmp_path / "plain"
    kiln.compile("tiny-llama", plain, recipe="fp32", progress=False)
    assert_one_line_error(run_kiln("run", str(plain), "-p", "hi", "--speculative", "draft"), "has no bundled draft")
    with pytest.raises(SpeculationError, match="has no bundled draft"):
        kiln.load(plain).speculation("draft")
    # a manifest whose draft path leaves the artifact is refused on load
    moved = tmp_path / "moved"
    shutil.copytree(bundled, moved)
    manifest = json.loads((moved / "kiln.json").read_text())
    manifest["draft"]["path"] = "../plain"
    (moved / "kiln.json").write_text(json.dumps(manifest))
    assert_one_line_error(run_kiln("run", str(moved), "-p", "hi"), "draft.path '../plain' is not a plain relative path")
    proc = run_kiln("compile", "tiny-llama", "--draft", "-t", "gpu", "-o", str(tmp_path / "gpu"))
    assert_one_line_error(proc, "--draft derives an ORT CPU draft", "target gpu")
    assert_nothing_left(tmp_path, "gpu")
    # kiln's draft recipe cannot make a draft of a two-layer model: refused, nothing written
    proc = run_kiln("compile", "tiny-llama", "-r", "fp32", "--draft", "-o", str(tmp_path / "out"), "-q")
    assert_one_line_error(proc, "insert-kv-cache", "drop-layers")
    assert_nothing_left(tmp_path, "out")

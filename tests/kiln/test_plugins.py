"""A plugin installed as a real package (entry point `kiln.passes`) runs from a TOML recipe."""

import json

import pytest
from conftest import run_kiln


@pytest.mark.slow  # pip-installs the plugin package
def test_plugin_pass_runs_from_a_recipe_and_is_recorded(tmp_path, plugin_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "with-plugin"\n[[passes]]\nname = "fold-constants"\n'
                      '[[passes]]\nname = "count-ops"\nop_type = "MatMul"\n')
    out = tmp_path / "art"
    proc = run_kiln("compile", "tiny-llama", "-r", str(recipe), "-o", str(out), "-q",
                    env={"PYTHONPATH": str(plugin_path)})
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "kiln.json").read_text())
    names = [r["name"] for r in manifest["passes"]]
    assert names[:2] == ["fold-constants", "count-ops"]  # in the recipe's order, recorded once
    assert names.count("count-ops") == 1
    record = manifest["passes"][1]
    assert record["params"] == {"op_type": "MatMul"} and record["modified"] is False
    assert record["stats"]["count"] >= 14  # 2 layers x 7 projections + lm head
    assert manifest["recipe"]["name"] == "with-plugin"

    listing = run_kiln("passes", env={"PYTHONPATH": str(plugin_path), "COLUMNS": "200"})
    assert "count-ops" in listing.stdout and "kiln_plugin_example" in listing.stdout

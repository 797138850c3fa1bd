"""--target-params / --target-size hand a whole-model target to the recipe's structural pass."""

import json

from conftest import run_kiln
from test_cli_errors import assert_nothing_left, assert_one_line_error


def test_target_params_reaches_the_structural_pass(tmp_path):
    proc = run_kiln("compile", "tiny-llama", "-r", "prune-mlp", "-o", str(tmp_path / "a"), "-q",
                    "--target-params", "0.9")
    assert proc.returncode == 0, proc.stderr
    record = next(p for p in json.loads((tmp_path / "a" / "kiln.json").read_text())["passes"]
                  if p["name"] == "prune-mlp")
    assert record["params"]["target_params"] == 0.9
    kept = record["stats"]["params_after"] / record["stats"]["params_before"]
    assert 0.85 < kept <= 0.9


def test_a_target_needs_one_structural_pass(tmp_path):
    proc = run_kiln("compile", "tiny-llama", "-o", str(tmp_path / "a"), "--target-params", "0.9")
    assert_one_line_error(proc, "exactly one structural pass")
    assert_nothing_left(tmp_path, "a")
    proc = run_kiln("compile", "tiny-llama", "-r", "prune-mlp", "-o", str(tmp_path / "b"), "--target-size", "lots")
    assert proc.returncode != 0 and "is not a size like 60MB" in proc.stderr and "Traceback" not in proc.stderr

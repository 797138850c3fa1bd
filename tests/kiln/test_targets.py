"""Target profiles (cpu, gpu, npu) and their defaults; --target-params / --target-size hand a
whole-model target to the recipe's structural pass."""

import json

import pytest

from conftest import run_kiln
from test_cli_errors import assert_nothing_left, assert_one_line_error


@pytest.mark.slow  # structural passes through the CLI
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


def test_profiles():
    from kiln.targets import TargetError, get_target

    cpu, gpu, npu = get_target("cpu"), get_target("gpu"), get_target("npu")
    assert cpu.providers == ("CPUExecutionProvider",) and cpu.precision == "fp32" and cpu.static_shapes is None
    assert gpu.providers == ("CUDAExecutionProvider", "CPUExecutionProvider") and gpu.precision == "fp16"
    assert npu.static_shapes == {"batch": 1, "sequence": 128} and npu.op_allowlist == "qnn-htp"
    assert npu.default_recipe == "npu-int8" and npu.precision == "int8-qdq"
    with pytest.raises(TargetError, match="unknown target 'tpu' \\(available: cpu, gpu, npu\\)"):
        get_target("tpu")


@pytest.mark.slow  # the npu recipe's calibration
def test_npu_gets_its_recipe_by_default(tmp_path):
    proc = run_kiln("compile", "tiny-bert", "-t", "npu", "-o", str(tmp_path / "a"), "-q")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "a" / "kiln.json").read_text())
    assert manifest["recipe"]["name"] == "npu-int8" and manifest["target"]["name"] == "npu"


def test_help_names_the_targets():
    proc = run_kiln("compile", "--help", env={"COLUMNS": "250"})
    text = " ".join(proc.stdout.split())
    assert "cpu, gpu (fp16, CUDA EP) or npu" in text and "npu-int8 on npu" in text

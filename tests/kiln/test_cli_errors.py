"""Every bad input gets one clear line, a non-zero exit, no traceback, and no artifact."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import assert_nothing_left, assert_one_line_error, run_kiln
from kiln.models.cache import atomic_dir


def test_unknown_model(tmp_path):
    proc = run_kiln("compile", "no-such-model", "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "unknown model 'no-such-model'", "smollm2-135m")
    assert_nothing_left(tmp_path, "out")


def test_truncated_onnx_to_inspect_and_compile(tmp_path, prepared):
    data = prepared("tiny-llama").path.read_bytes()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_kiln("inspect", str(broken)), "broken.onnx", "not a valid ONNX model")
    assert_one_line_error(run_kiln("compile", str(broken), "-o", str(tmp_path / "out")), "not a valid ONNX model")
    assert_nothing_left(tmp_path, "out")


def test_missing_paths(tmp_path):
    assert_one_line_error(run_kiln("inspect", str(tmp_path / "nope.onnx")), "no such ONNX file")
    assert_one_line_error(run_kiln("run", str(tmp_path), "--prompt", "x"), "not a kiln artifact")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("passes = [", "invalid TOML"),
        ('name = "r"\n', "needs a non-empty [[passes]] list"),
        ('[[passes]]\nname = "no-such-pass"\n', "unknown pass 'no-such-pass'"),
        ('[[passes]]\nname = "fold-constants"\nfast = true\n', "has no parameter 'fast'"),
        ('[[passes]]\nsize_limit = 3\n', "needs a 'name' string"),
        ('calibration_windows = 0\n[[passes]]\nname = "fold-constants"\n', "'calibration_windows' must be a whole"),
    ],
)
def test_invalid_recipe(tmp_path, text, fragment):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    proc = run_kiln("compile", "tiny-llama", "-r", str(recipe), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, fragment)
    assert_nothing_left(tmp_path, "out")


def test_unknown_recipe_target_backend(tmp_path):
    out = str(tmp_path / "out")
    assert_one_line_error(run_kiln("compile", "tiny-llama", "-r", "turbo", "-o", out), "unknown recipe 'turbo'")
    assert_one_line_error(run_kiln("compile", "tiny-llama", "-t", "fpga", "-o", out), "unknown target 'fpga'")
    assert_one_line_error(run_kiln("compile", "tiny-llama", "-b", "xla", "-o", out), "unknown backend 'xla'")
    assert_nothing_left(tmp_path, "out")


def test_existing_output_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(run_kiln("compile", "tiny-llama", "-o", str(out)), "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_debug_shows_the_traceback(tmp_path):
    proc = run_kiln("--debug", "compile", "no-such-model", "-o", str(tmp_path / "out"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_unknown_manifest_major_version_is_refused(tmp_path):
    (tmp_path / "kiln.json").write_text(json.dumps({"schema_version": "2.0"}))
    assert_one_line_error(run_kiln("run", str(tmp_path), "--prompt", "x"), "schema version 2.0 is not supported")


@pytest.mark.parametrize("version", ["\x1e", "1\n2", "\u2028"])
def test_control_characters_in_an_error_stay_on_one_line(tmp_path, version):
    """Found by the manifest fuzzer: a record separator in schema_version split the error line."""
    (tmp_path / "kiln.json").write_text(json.dumps({"schema_version": version}))
    escaped = version.encode("unicode_escape").decode()
    assert_one_line_error(run_kiln("run", str(tmp_path), "--prompt", "x"), f"schema version {escaped} is not")


@pytest.mark.slow  # compiles the default int4 recipe (scale tuning) through the CLI
def test_wrong_task_arguments(tmp_path, prepared):
    out = tmp_path / "llm"
    assert run_kiln("compile", "tiny-llama", "-o", str(out), "-q").returncode == 0
    assert_one_line_error(run_kiln("run", str(out), "--text", "hi"), "LLM artifact: give --prompt")


@pytest.mark.slow  # pip-installs the plugin package
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_compile_killed_midway_leaves_nothing(tmp_path, plugin_path, prepared, sig):
    prepared("tiny-llama")  # export cached, so the compile reaches the passes quickly
    marker = tmp_path / "in-pipeline"
    recipe = tmp_path / "slow.toml"
    recipe.write_text(f'[[passes]]\nname = "fold-constants"\n[[passes]]\nname = "wait"\nseconds = 60\nmarker = "{marker}"\n')
    out = tmp_path / "out"
    # A shell starts background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN:
    # the child gets the default disposition back, as a compile started in a terminal has.
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "compile", "tiny-llama", "-r", str(recipe), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(plugin_path)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1]
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert_one_line_error(subprocess.CompletedProcess([], proc.returncode, stdout, stderr), "interrupted")
    assert_nothing_left(tmp_path, "out")


def test_atomic_dir_cleans_up_on_failure_and_after_sigkill(tmp_path):
    final = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "model.onnx").write_text("partial")
            raise RuntimeError("disk full")
    assert_nothing_left(tmp_path, "art")

    # A process killed outright leaves its temp dir; the next writer removes it.
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stale = tmp_path / f".art.tmp-{victim.pid}-abc"
    stale.mkdir()
    victim.kill()
    victim.wait()
    with atomic_dir(final) as tmp:
        (tmp / "ok").write_text("1")
    assert (final / "ok").exists()
    assert not stale.exists()


def test_eval_corpus_unknown_or_given_with_a_text(tmp_path):
    proc = run_kiln("eval", str(tmp_path), "--corpus", "reddit")
    assert_one_line_error(proc, "unknown corpus 'reddit'", "newsgroups")
    (tmp_path / "t.txt").write_text("some text")
    proc = run_kiln("eval", str(tmp_path), "--corpus", "lee", "--text", str(tmp_path / "t.txt"))
    assert_one_line_error(proc, "--text FILE or --corpus NAME, not both")

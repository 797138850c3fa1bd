"""The runtime deploys without the compiler: an empty venv (no system site-packages) gets kiln
with `--no-deps` plus only the runtime's dependencies (pyproject's base `dependencies`, at the
versions this interpreter has, so the numerics are the same), and `kiln run` there gives the
same tokens as the full install. pip finds the packages in its cache or the configured indexes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from conftest import REPO

import kiln

pytestmark = pytest.mark.slow  # creates a venv and pip-installs the runtime into it (about a minute)

PROMPTS = ["Hello, world", "The quick brown fox jumps"]


def _runtime_requirements() -> list[str]:
    """pyproject's base dependencies, pinned to the versions installed here."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [d.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip() for d in deps]
    return [f"{n}=={importlib.metadata.version(n)}" for n in names]


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runtime-venv") / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(root)
    python = root / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in (["--no-deps", "-e", str(REPO)], _runtime_requirements()):
        proc = subprocess.run([*pip, *args], capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, prepared) -> Path:
    prepared("tiny-llama")
    return kiln.compile("tiny-llama", tmp_path_factory.mktemp("venv-art") / "a", progress=False).path


def _run(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(root / "bin" / "kiln"), *args], capture_output=True, text=True, env=env,
                          cwd=root.parent, timeout=300)


def test_the_venv_has_no_compiler(runtime_venv):
    probe = ("import importlib.util as u; "
             "print([m for m in ('torch', 'transformers', 'onnx', 'onnx_ir', 'onnxscript', 'tvm', 'networkx') "
             "if u.find_spec(m)])")
    proc = subprocess.run([str(runtime_venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                          cwd=runtime_venv.parent)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_kiln_run_in_the_runtime_venv_gives_the_same_tokens(runtime_venv, tiny):
    art = kiln.load(tiny)
    for prompt in PROMPTS:
        proc = _run(runtime_venv, "run", str(tiny), "--prompt", prompt, "-n", "16", "--json")
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
        want = art.generate(prompt, 16)
        assert got["token_ids"] == want.token_ids and got["text"] == want.text, prompt
    # streamed text too, as a user sees it
    full = subprocess.run([sys.executable, "-m", "kiln.cli", "run", str(tiny), "--prompt", PROMPTS[0], "-n", "12"],
                          capture_output=True, text=True, timeout=300)
    assert _run(runtime_venv, "run", str(tiny), "--prompt", PROMPTS[0], "-n", "12").stdout == full.stdout


def test_a_tvm_artifact_runs_with_the_tvm_extra_alone(runtime_venv, tmp_path_factory, prepared):
    """The venv plus the `tvm` extra (apache-tvm, no torch): a TVM artifact gives the ORT tokens.
    It adds TVM to the module's venv: the compile commands' test after it still finds no torch."""
    prepared("tiny-llama")
    path = kiln.compile("tiny-llama", tmp_path_factory.mktemp("venv-tvm") / "a", recipe="fp32", backend="tvm",
                        progress=False).path
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tvm"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(runtime_venv / "bin" / "python"), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", *[d.split("#")[0].strip() for d in extra]],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probe = "import importlib.util as u; print(bool(u.find_spec('torch')))"
    torch_there = subprocess.run([str(runtime_venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                                 cwd=runtime_venv.parent)
    assert torch_there.stdout.strip() == "False", torch_there.stderr
    want = kiln.load(path).generate(PROMPTS[0], 12).token_ids
    proc = _run(runtime_venv, "run", str(path), "--prompt", PROMPTS[0], "-n", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["token_ids"] == want


def test_compile_commands_name_the_extra_in_the_runtime_venv(runtime_venv, tmp_path):
    for args in (["compile", "tiny-llama", "-o", str(tmp_path / "x")], ["models"]):
        proc = _run(runtime_venv, *args)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: ") and "pip install 'kiln[compile]'" in lines[0]

"""Shared fixtures. Exports are cached in $KILN_CACHE (content-addressed), so repeated
runs reuse them; every test that mutates a model gets its own fresh copy."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from kiln.ir import load_model, summary
from kiln.models import get_source, prepare, sample_inputs
from kiln.passes.numerics import compare, run_ort

REPO = Path(__file__).resolve().parents[1]


def _one_thread_per_worker() -> None:
    """Under `pytest -n N`, torch in each worker computes on one thread: N workers that each spread
    torch over every core only make each other wait."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


_one_thread_per_worker()


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    """`-m "not slow"` does not import a module marked slow as a whole (TVM, Node, peft imports)."""
    if config.option.markexpr == "not slow" and collection_path.suffix == ".py":
        head = collection_path.read_text()[:4000]
        if "\npytestmark = pytest.mark.slow" in head:
            return True
    return None


@pytest.fixture(scope="session")
def prepared():
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = prepare(get_source(name), progress=False)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def compiled(tmp_path_factory, prepared):
    """(model, recipe=None, target=None) -> an artifact compiled once per test run and shared by every
    xdist worker (a lock file orders them). Its files are read-only: a test that edits an artifact
    copies it first (tests/artifact_edits.copy_artifact). A recipe given as a file is keyed by its text."""
    import fcntl
    import hashlib
    import shutil

    import kiln

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-artifacts"
    root.mkdir(exist_ok=True)

    def get(model: str, recipe: str | Path | None = None, target: str | None = None) -> Path:
        spec = Path(recipe).read_text() if recipe and Path(recipe).is_file() else recipe
        key = hashlib.sha256(repr((model, spec, target)).encode()).hexdigest()[:12]
        final = root / f"{model}-{key}"
        with open(root / f"{final.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (final / "kiln.json").is_file():
                shutil.rmtree(final, ignore_errors=True)  # what a failed build left
                prepared(model)
                kiln.compile(model, final, recipe=recipe, target=target or "cpu", progress=False)
                for path in final.rglob("*"):
                    if path.is_file():
                        path.chmod(0o444)
        return final

    return get


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory) -> Path:
    """tests/plugin_pkg installed as a real package (with its entry points) into a private dir."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(REPO / "tests" / "plugin_pkg")],
        check=True, capture_output=True,
    )
    return target


@pytest.fixture
def tiny_llama_ir(prepared) -> ir.Model:
    return load_model(prepared("tiny-llama").path)


@pytest.fixture
def tiny_llama_feeds(prepared, tiny_llama_ir):
    return sample_inputs(prepared("tiny-llama").meta, summary(tiny_llama_ir).inputs)


def assert_same_outputs(before: ir.Model, after: ir.Model, feeds, rtol: float = 1e-4) -> dict:
    delta = compare(run_ort(before, feeds), run_ort(after, feeds))
    assert delta["max_rel"] <= rtol, delta
    return delta


def run_kiln(*args: str, env: dict | None = None, timeout: int = 600, isolated: bool = False
             ) -> subprocess.CompletedProcess:
    """Run the CLI's `main()` as a user would and return its exit code, stdout and stderr. In this
    process, where the imports are already paid for (seconds per call), unless `env` or `isolated`
    asks for a fresh interpreter."""
    if env is None and not isolated:
        return _run_in_process(args)
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def _run_in_process(args: tuple[str, ...]) -> subprocess.CompletedProcess:
    from kiln import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    argv, handler, state = sys.argv, signal.getsignal(signal.SIGTERM), dict(cli._state)
    sys.argv, code = ["kiln", *args], 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except Exception:  # what the interpreter does with an uncaught exception (`--debug` re-raises)
        stderr.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, handler)
        cli._state.update(state)
    return subprocess.CompletedProcess(["kiln", *args], code, stdout.getvalue(), stderr.getvalue())


def tiny_graph() -> ir.Model:
    """y = Relu(x @ W + b), z = Identity(y); x: float[N, 4]."""
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["N", 4]))
    w = ir.val("W", const_value=ir.tensor(np.arange(12, dtype=np.float32).reshape(4, 3) / 10))
    b = ir.val("b", const_value=ir.tensor(np.ones(3, dtype=np.float32)))
    mm = ir.node("MatMul", [x, w], num_outputs=1)
    add = ir.node("Add", [mm.outputs[0], b], num_outputs=1)
    relu = ir.node("Relu", [add.outputs[0]], num_outputs=1)
    relu.outputs[0].name = "y"
    for node in (mm, add, relu):
        node.outputs[0].dtype = ir.DataType.FLOAT
        node.outputs[0].shape = ir.Shape(["N", 3])
    graph = ir.Graph([x], [relu.outputs[0]], nodes=[mm, add, relu], initializers=[w, b],
                     opset_imports={"": 21}, name="tiny")
    return ir.Model(graph, ir_version=10)


CLEANUP = ["fold-constants", "simplify", "eliminate-common-subexpressions", "fold-constants"]


@pytest.fixture
def cleaned(prepared):
    """name -> (meta, model after the cleanup passes, sample feeds, calibration feeds)."""
    from kiln.passes import create_pass, run_pipeline

    def get(name: str):
        p = prepared(name)
        model = load_model(p.path)
        feeds = sample_inputs(p.meta, summary(model).inputs)
        model = run_pipeline(model, [create_pass(n) for n in CLEANUP], feeds, progress=False).model
        rng = np.random.default_rng(1)
        vocab = p.meta.get("vocab_size", 256)
        calib = [{k: (rng.integers(0, min(vocab, 256), size=(1, 32)) if k == "input_ids" else
                      np.ones((1, 32), dtype=v.dtype) if "mask" in k else np.zeros((1, 32), dtype=v.dtype))
                  for k, v in feeds.items()} for _ in range(4)]
        return p.meta, model, feeds, calib

    return get


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in lines[0]


def assert_nothing_left(directory, name):
    assert not (directory / name).exists()
    assert not list(directory.glob(f".{name}.tmp-*"))


@pytest.fixture
def pipelined(prepared):
    """(name, extra pass names) -> (meta, model after the cleanup passes and the extra ones, the feeds
    the pipeline leaves: with the cache inputs once insert-kv-cache has run)."""
    from kiln.passes import create_pass, run_pipeline

    def get(name: str, extra=()):
        p = prepared(name)
        model = load_model(p.path)
        feeds = sample_inputs(p.meta, summary(model).inputs)
        run = run_pipeline(model, [create_pass(n) for n in [*CLEANUP, *extra]], feeds, progress=False)
        return p.meta, run.model, run.feeds

    return get

"""Writing artifacts: --force replaces only what kiln made, every failure to write is one line
with nothing left, replacing is atomic under concurrency, and two compiles give the same bytes."""

import errno
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kiln
from conftest import assert_nothing_left, assert_one_line_error, run_kiln
from kiln.errors import KilnError
from kiln.models.cache import atomic_dir, exclusive

TIMING = {"created", "seconds", "export_seconds"}  # the fields that differ between two compiles


def _contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _victim(directory: Path) -> dict[str, bytes]:
    (directory / "src").mkdir(parents=True)
    (directory / "notes.txt").write_text("mine")
    (directory / "src" / "main.py").write_text("print('hello')\n")
    return _contents(directory)


def test_force_never_replaces_a_directory_kiln_did_not_make(tmp_path):
    victim = tmp_path / "project"
    before = _victim(victim)
    proc = run_kiln("compile", "tiny-llama", "-r", "fp32", "-o", str(victim), "--force")
    assert_one_line_error(proc, "is not a kiln artifact", "notes.txt", "--force replaces only")
    assert _contents(victim) == before
    assert not list(tmp_path.glob(".project.*"))


def test_force_on_the_working_directory_home_or_root_is_refused(tmp_path, monkeypatch):
    work = tmp_path / "work"
    before = _victim(work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for target, fragment in ((".", "the working directory"), ("..", "holds the working directory"),
                             (str(tmp_path / "home"), "your home directory"), ("/", "the root directory")):
        (tmp_path / "home").mkdir(exist_ok=True)
        proc = run_kiln("compile", "tiny-llama", "-o", target, "--force")
        assert_one_line_error(proc, "refusing to write the artifact", fragment)
        assert _contents(work) == before


def test_the_cache_is_refused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "exports").mkdir(parents=True)
    monkeypatch.setenv("KILN_CACHE", str(cache))
    for target in (cache, cache / "exports", tmp_path):
        proc = run_kiln("compile", "tiny-llama", "-o", str(target), "--force")
        assert_one_line_error(proc, "refusing to write the artifact", "kiln cache")
    assert sorted(p.name for p in cache.iterdir()) == ["exports"]


def test_a_file_or_a_symlink_in_the_way_is_refused(tmp_path):
    (tmp_path / "file").write_text("data")
    assert_one_line_error(run_kiln("compile", "tiny-llama", "-o", str(tmp_path / "file"), "--force"),
                          "is a file, not an artifact directory")
    assert_one_line_error(run_kiln("compile", "tiny-llama", "-o", str(tmp_path / "file" / "out")),
                          "cannot create", "is a file")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    assert_one_line_error(run_kiln("compile", "tiny-llama", "-o", str(tmp_path / "link"), "--force"),
                          "is a symbolic link")
    assert (tmp_path / "file").read_text() == "data" and not (tmp_path / "elsewhere").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_an_unwritable_parent_is_found_before_the_compile(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert_one_line_error(run_kiln("compile", "tiny-llama", "-o", str(parent / "out")), "is not writable")
    finally:
        parent.chmod(0o755)
    assert list(parent.iterdir()) == []


def test_force_replaces_an_artifact_or_an_empty_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    kiln.compile("tiny-llama", out, recipe="fp32", force=True, progress=False)
    first = json.loads((out / "kiln.json").read_text())
    kiln.compile("tiny-llama", out, recipe="none", force=True, progress=False)
    assert json.loads((out / "kiln.json").read_text())["recipe"]["name"] != first["recipe"]["name"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder, no lock file


@pytest.mark.slow  # replaces an artifact under a reader, repeatedly
def test_a_loaded_artifact_finishes_on_the_old_one_while_it_is_replaced(tmp_path):
    out = tmp_path / "out"
    kiln.compile("tiny-llama", out, recipe="fp32", progress=False)
    art = kiln.load(out)
    want = art.generate(art.encode("kiln"), max_new_tokens=8).token_ids
    kiln.compile("tiny-llama", out, recipe="drop-layers", force=True, progress=False)
    assert art.generate(art.encode("kiln"), max_new_tokens=8).token_ids == want
    assert kiln.load(out).manifest["recipe"]["name"] == "drop-layers"


def test_a_disk_error_while_writing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import kiln.compiler as compiler

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(compiler, "describe_files", full)
    with pytest.raises(KilnError, match="could not write the artifact to .*No space left on device"):
        kiln.compile("tiny-llama", tmp_path / "out", recipe="fp32", progress=False)
    assert_nothing_left(tmp_path, "out")


def test_the_manifest_is_validated_before_the_artifact_appears(tmp_path, monkeypatch):
    import kiln.compiler as compiler

    real = compiler._manifest
    monkeypatch.setattr(compiler, "_manifest", lambda *a: {**real(*a), "task": 5})
    with pytest.raises(KilnError, match="invalid manifest: task"):
        kiln.compile("tiny-llama", tmp_path / "out", recipe="fp32", progress=False)
    assert_nothing_left(tmp_path, "out")


def test_a_second_compile_into_the_same_output_fails_cleanly(tmp_path):
    out = tmp_path / "out"
    with exclusive(out):  # as a first compile holds it for its whole run
        assert_one_line_error(run_kiln("compile", "tiny-llama", "-o", str(out), "--force"),
                              "another kiln compile is writing")
    assert_nothing_left(tmp_path, "out")


def test_stale_temp_folders_of_killed_runs_are_removed_by_any_later_compile(tmp_path):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    victim.kill()
    victim.wait()
    stale = tmp_path / f".other.tmp-{victim.pid}-abc"
    (stale / "sub").mkdir(parents=True)
    export = Path(os.environ.get("TMPDIR", "/tmp")) / f"kiln-export-tmp-{victim.pid}-xyz"
    export.mkdir()
    live = tmp_path / f".busy.tmp-{os.getpid()}-abc"  # a running writer's folder stays
    live.mkdir()
    kiln.compile("tiny-llama", tmp_path / "out", recipe="fp32", progress=False)
    assert not stale.exists() and not export.exists() and live.exists()


def _read(name: str, dir_fd: int) -> str:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    with os.fdopen(fd) as f:
        return f.read()


def _writer(final: str, tag: str, rounds: int, failures) -> None:
    for i in range(rounds):
        try:
            with atomic_dir(Path(final), "replace") as tmp:
                for name in ("a", "b", "c"):
                    (tmp / name).write_text(f"{tag}-{i}")
        except OSError:
            failures.value += 1


@pytest.mark.slow  # 2 writers x 200 replacements
def test_atomic_replace_race(tmp_path):
    """2 writers x 200 replacements, a reader in a loop: no failed replacement, and the reader
    always finds the directory, whole (three files written by the same replacement)."""
    final = tmp_path / "art"
    with atomic_dir(final, "new") as tmp:
        for name in ("a", "b", "c"):
            (tmp / name).write_text("first-0")
    ctx = multiprocessing.get_context("spawn")
    failures = ctx.Value("i", 0)
    writers = [ctx.Process(target=_writer, args=(str(final), tag, 200, failures)) for tag in ("w1", "w2")]
    for w in writers:
        w.start()
    reads, bad = 0, []
    while any(w.is_alive() for w in writers):
        try:  # a reader pins the directory it opened, as a loaded artifact holds its files
            fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            bad.append("missing")
            continue
        try:
            contents = {_read(n, fd) for n in ("a", "b", "c")}
        except FileNotFoundError:  # fine only if the pinned copy was replaced and is being deleted
            if not final.exists():
                bad.append("missing")
            elif os.stat(final).st_ino == os.fstat(fd).st_ino:
                bad.append("a file missing from the published directory")
            continue
        finally:
            os.close(fd)
        reads += 1
        if len(contents) != 1:
            bad.append(f"partial: {contents}")
    for w in writers:
        w.join()
    assert failures.value == 0 and not bad[:3] and reads > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def _strip_timing(value):
    if isinstance(value, dict):
        return {k: _strip_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_strip_timing(v) for v in value]
    return value


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def assert_reproducible(model: str, tmp_path: Path, **kwargs) -> None:
    first, second = tmp_path / "one" / "art", tmp_path / "two" / "elsewhere"
    kiln.compile(model, first, progress=False, **kwargs)
    kiln.compile(model, second, progress=False, **kwargs)
    a, b = _contents(first), _contents(second)
    assert a.keys() == b.keys()
    for name in a:
        if name != "kiln.json":
            assert a[name] == b[name], name
    ma, mb = (json.loads(x["kiln.json"]) for x in (a, b))
    assert _strip_timing(ma) == _strip_timing(mb)
    paths = [s for s in _strings(ma) if s.startswith("/") or str(tmp_path) in s or str(Path.home()) in s]
    assert not paths, paths


def test_two_compiles_of_tiny_llama_are_byte_identical(tmp_path):
    assert_reproducible("tiny-llama", tmp_path, recipe="fp32")


@pytest.mark.slow  # fetches and compiles the real MiniLM
def test_two_compiles_of_minilm_are_byte_identical(tmp_path):
    assert_reproducible("minilm-l6", tmp_path)

"""The bad-input table of docs/reliability.md, produced by running every case through the CLI.

    python -m benchmarks.reliability            # prints the Markdown table
    python -m benchmarks.reliability --write    # and replaces the table in docs/reliability.md

Each case builds what it needs in a scratch directory (a tiny-llama artifact, a victim folder, a
hostile manifest or recipe), runs `kiln ...` in a subprocess as a user would, and records the exit
code, the one line printed on stderr and what is left on disk. Each case is also a test (named in
the last column); this script only shows them side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- cases: begin -->", "<!-- cases: end -->"


def kiln(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)


def listing(directory: Path) -> str:
    if not directory.exists():
        return "nothing"
    names = sorted(p.name for p in directory.iterdir())
    return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "") if names else "empty"


def edit(artifact: Path, change) -> Path:
    manifest = json.loads((artifact / "kiln.json").read_text())
    change(manifest)
    (artifact / "kiln.json").write_text(json.dumps(manifest))
    return artifact


def cases(work: Path, llm: Path):
    """(title, test, setup) where setup(dir) returns (argv, cwd, what to list afterwards)."""

    def copy(d: Path, name: str = "art") -> Path:
        return Path(shutil.copytree(llm, d / name))

    def victim(d: Path) -> Path:
        (d / "project" / "src").mkdir(parents=True)
        (d / "project" / "notes.txt").write_text("mine")
        return d / "project"

    def recipe(d: Path, text: str | bytes) -> Path:
        path = d / "r.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    fold = '[[passes]]\nname = "fold-constants"\n'
    marker = work / "MARKER"
    payload = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"

    yield ("chat template reaching os.system", "test_artifact_safety::test_chat_template_payload_is_refused",
           lambda d: (["run", str(edit(copy(d), lambda m: m["generation"].update(chat_template=payload))),
                       "--chat", "-p", "hi", "-n", "2"], None, marker))
    yield ("`-o . --force`", "test_output_safety::test_force_on_the_working_directory_home_or_root_is_refused",
           lambda d: (["compile", "tiny-llama", "-o", ".", "--force"], victim(d), d / "project"))
    yield ("`-o DIR --force`, DIR not an artifact", "test_output_safety::test_force_never_replaces_*",
           lambda d: (["compile", "tiny-llama", "-o", str(victim(d)), "--force"], None, d / "project"))
    yield ("`-o FILE --force`", "test_output_safety::test_a_file_or_a_symlink_in_the_way_is_refused",
           lambda d: ((d / "f").write_text("data"), ["compile", "tiny-llama", "-o", str(d / "f"), "--force"], None,
                      d)[1:])
    if os.geteuid() != 0:  # root may write into a read-only directory
        yield ("`-o` under a read-only directory", "test_output_safety::test_an_unwritable_parent_*",
               lambda d: ((d / "ro").mkdir(), (d / "ro").chmod(0o555),
                          ["compile", "tiny-llama", "-o", str(d / "ro" / "out")], None, d / "ro")[2:])
    yield ("manifest `backend.model` = /etc/passwd", "test_artifact_safety::test_paths_outside_*",
           lambda d: (["run", str(edit(copy(d), lambda m: m["backend"].update(model="/etc/passwd"))), "-p", "hi"],
                      None, d / "art"))
    yield ("manifest `backend.model` = ../other/model.onnx", "test_artifact_safety::test_paths_outside_*",
           lambda d: (copy(d, "other"), ["run", str(edit(copy(d), lambda m: m["backend"].update(
               model="../other/model.onnx"))), "-p", "hi"], None, d / "art")[1:])
    yield ("manifest `tokenizer` = another artifact's", "test_artifact_safety::test_path_outside_is_one_line_*",
           lambda d: (copy(d, "other"), ["run", str(edit(copy(d), lambda m: m.update(
               tokenizer="../other/tokenizer.json"))), "-p", "hi"], None, d / "art")[1:])
    yield ("model.onnx a symlink out of the artifact", "test_artifact_safety::test_symlinked_model_is_refused",
           lambda d: _symlinked(copy(d, "other"), copy(d)))
    yield ("recipe `name = 5`", "test_recipe_validation::test_compile_refuses_before_any_work",
           lambda d: (["compile", "tiny-llama", "-r", str(recipe(d, "name = 5\n" + fold)), "-o", str(d / "out")],
                      None, d / "out"))
    yield ("recipe whose `base` is itself by path", "test_recipe_validation::test_base_cycles_by_resolved_path",
           lambda d: (["compile", "tiny-llama", "-r", str(recipe(d, 'base = "r.toml"\n' + fold)), "-o",
                       str(d / "out")], None, d / "out"))
    yield ("binary recipe file", "test_recipe_validation::test_binary_recipe_file",
           lambda d: (["compile", "tiny-llama", "-r", str(recipe(d, b"\xff\xfe\x00bad")), "-o", str(d / "out")],
                      None, d / "out"))
    yield ('pass parameter `size_limit = "big"`', "test_recipe_validation::test_pass_parameter_types",
           lambda d: (["compile", "tiny-llama", "-r", str(recipe(d, fold + 'size_limit = "big"\n')), "-o",
                       str(d / "out")], None, d / "out"))
    yield ("invalid UTF-8 prompt", "test_artifact_safety::test_invalid_utf8_prompt_and_text",
           lambda d: (["run", str(copy(d)), "-p", "caf\udcff"], None, d / "art"))
    yield ("garbage tokenizer.json", "test_artifact_safety::test_broken_tokenizer",
           lambda d: (_garbage_tokenizer(copy(d)), ["run", str(d / "art"), "-p", "hi"], None, d / "art")[1:])
    yield ("manifest kv_heads disagreeing with the graph", "test_artifact_safety::test_kv_layout_that_disagrees_*",
           lambda d: (["run", str(edit(copy(d), lambda m: m["kv_cache"].update(kv_heads=3))), "-p", "hi"], None,
                      d / "art"))
    yield ("zeroed weights, `--verify`", "test_artifact_safety::test_zeroed_weights_are_caught_by_verify",
           lambda d: (_zeroed(copy(d)), ["run", str(d / "art"), "-p", "hi", "--verify"], None, d / "art")[1:])
    yield ("truncated weights", "test_artifact_safety::test_truncated_file_is_refused_without_verify",
           lambda d: (_truncated(copy(d)), ["run", str(d / "art"), "-p", "hi"], None, d / "art")[1:])


def _symlinked(other: Path, art: Path):
    (art / "model.onnx").unlink()
    (art / "model.onnx").symlink_to(other / "model.onnx")
    return ["run", str(art), "-p", "hi"], None, art


def _garbage_tokenizer(art: Path) -> None:
    (art / "tokenizer.json").write_text("{not json")
    edit(art, lambda m: m["files"]["tokenizer.json"].update(bytes=9))


def _zeroed(art: Path) -> None:
    data = art / "model.onnx.data"
    data.write_bytes(bytes(data.stat().st_size))


def _truncated(art: Path) -> None:
    data = art / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])


def _cell(text: str) -> str:
    text = text.encode("utf-8", "backslashreplace").decode()  # the invalid-UTF-8 case's lone surrogate
    text = text.replace(str(Path(tempfile.gettempdir())), "$TMP").replace("|", "\\|")
    return re.sub(r"\$TMP/kiln-rel-[^/]+/\d+", "…", text)


def table() -> str:
    with tempfile.TemporaryDirectory(prefix="kiln-rel-") as tmp:
        work = Path(tmp)
        llm = work / "tiny-llama"
        proc = kiln("compile", "tiny-llama", "-r", "fp32", "-o", str(llm), "-q")
        if proc.returncode:
            raise SystemExit(proc.stderr)
        rows = ["| case | command | exit | stderr (one line) | left on disk | test |", "|---|---|---|---|---|---|"]
        for i, (title, test, setup) in enumerate(cases(work, llm)):
            d = work / str(i)
            d.mkdir()
            argv, cwd, watch = setup(d)
            before = listing(watch) if watch.is_dir() else None
            proc = kiln(*argv, cwd=cwd)
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            line = lines[0] if len(lines) == 1 else f"{len(lines)} lines: " + " / ".join(lines[:2])
            after = ("no marker file" if not watch.exists() else "MARKER CREATED") if watch.name == "MARKER" else (
                f"unchanged ({before})" if before is not None and listing(watch) == before else listing(watch))
            command = "kiln " + " ".join(a if len(a) < 40 else "…" for a in argv)
            rows.append(f"| {title} | `{_cell(command)}` | {proc.returncode} | {_cell(line)} | {_cell(after)} | "
                        f"{test} |")
            for p in d.rglob("*"):
                if p.is_dir():
                    p.chmod(0o755)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in docs/reliability.md")
    args = parser.parse_args(argv)
    text = table()
    print(text)
    if args.write:
        doc = DOC.read_text()
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        DOC.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


if __name__ == "__main__":
    main()

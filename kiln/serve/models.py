"""The artifacts a server holds, each under its `model` name: the directory's name, or NAME
given as `NAME=DIR` on the command line; and the LoRA adapters loaded into an artifact's slots
(`--lora [MODEL:]NAME=ADAPTER_DIR`), each served as its own model `MODEL:NAME` that shares the
artifact's session and continuous batch."""

from __future__ import annotations

import dataclasses
import re
import threading
from pathlib import Path

from kiln.errors import KilnError
from kiln.runtime import Artifact, load

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # no ':' or '=': MODEL:NAME=DIR parses one way
TASKS = ("causal-lm", "embedding")


@dataclasses.dataclass(eq=False)
class Served:
    name: str
    art: Artifact
    loop: object | None = None  # kiln.serve.scheduler.DecodeLoop for a causal LM (shared by its adapters)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # one embedding batch at a time
    waiting: int = 0  # embedding requests queued or running
    base: Served | None = None  # for a LoRA adapter: the artifact's own entry
    adapter: str | None = None  # the adapter's name (--lora NAME=...)
    slot: int = 0  # its LoRA slot (0: the base model)

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


def parse_adapters(specs: list[str], models: list[str]) -> dict[str, dict[str, Path]]:
    """`--lora` options as {model: {adapter name: folder}}. `NAME=ADAPTER_DIR` goes to the one
    artifact served; with several served, each names its model: `MODEL:NAME=ADAPTER_DIR`."""
    out: dict[str, dict[str, Path]] = {}
    for spec in specs:
        left, sep, folder = spec.partition("=")
        if not sep or not left or not folder:
            raise KilnError(f"--lora '{spec}' is not [MODEL:]NAME=ADAPTER_DIR")
        model, colon, name = left.rpartition(":")
        if not colon:
            if len(models) != 1:
                raise KilnError(f"--lora '{spec}': {len(models)} models are served, so say which one the adapter "
                                f"is for: MODEL:{left}=ADAPTER_DIR (models: {', '.join(models)})")
            model = models[0]
        if not ADAPTER_NAME.match(name):
            raise KilnError(f"--lora '{spec}': '{name}' cannot be an adapter name (letters, digits and ._-)")
        if model not in models:
            raise KilnError(f"--lora '{spec}': no served model is named '{model}' (models: {', '.join(models)})")
        if name in out.setdefault(model, {}):
            raise KilnError(f"--lora '{spec}': the adapter name '{name}' is given twice for model '{model}'")
        out[model][name] = Path(folder)
    return out


def load_all(specs: list[str], threads: int | None, verify: bool,
             lora: list[str] | None = None) -> dict[str, Served]:
    """Load every artifact (with its adapters in its LoRA slots); adapters are served as
    `MODEL:NAME`, after their model."""
    named: list[tuple[str, Path, str]] = []
    for spec in specs:
        name, path = parse_spec(spec)
        if not NAME.match(name):
            raise KilnError(f"'{name}' cannot be a model name (letters, digits and ._:/-): serve it as NAME={spec}")
        if name in (n for n, _, _ in named):
            raise KilnError(f"two artifacts would be served as '{name}': name one of them, NAME={spec}")
        named.append((name, path, spec))
    adapters = parse_adapters(lora or [], [n for n, _, _ in named])
    taken = {n for n, _, _ in named}
    for model, names in adapters.items():
        for adapter in names:
            if f"{model}:{adapter}" in taken:
                raise KilnError(f"the adapter '{adapter}' of model '{model}' would be served as '{model}:{adapter}', "
                                "which is the name of a served artifact: rename one of them")
    served: dict[str, Served] = {}
    for name, path, _ in named:
        art = load(path, threads=threads, verify=verify, lora=adapters.get(name) or None)
        if art.task not in TASKS:
            raise KilnError(f"{path}: `kiln serve` serves causal-lm and embedding artifacts; this one is {art.task}")
        if art.tokenizer is None:
            raise KilnError(f"{path}: the artifact has no tokenizer, which the server needs")
        if adapters.get(name) and art.task != "causal-lm":
            raise KilnError(f"{path}: LoRA adapters are served for causal LMs; this artifact is {art.task}")
        served[name] = Served(name, art)
        for adapter, slot in art.adapters.items():
            served[f"{name}:{adapter}"] = Served(f"{name}:{adapter}", art, base=served[name], adapter=adapter,
                                                 slot=slot)
    return served

"""Recipes: named, validated lists of passes with parameters, written in TOML.

    name = "fp32"
    description = "..."
    lower = true                   # then the backend's lowering passes (default: true)
    calibration_windows = 64       # windows of 256 tokens of calibration text for data-aware passes
    base = "fp32"                  # optional: start from another recipe's passes, then these
    [[passes]]
    name = "fold-constants"        # a registered pass
    size_limit = 4096              # every other key is a parameter of that pass

A recipe argument is either the name of a built-in preset (a .toml file in this folder)
or a path to a .toml file. Every error names the recipe and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from kiln.errors import KilnError
from kiln.passes.base import KilnPass
from kiln.passes.registry import UnknownPassError, create_pass, printable

PRESETS_DIR = Path(__file__).parent
DEFAULT = "fp32"
# Without --recipe, a causal LM on the CPU through ORT gets 4-bit weights: decode is bound by
# reading the weights, so int4 (0.15x the bytes, run as MatMulNBits) is what a deployment wants.
# TVM keeps fp32: its int4 kernels (expand-dequantize, dequantized inside the matmul) compile and
# match ORT, but take neither kiln's weight panels nor tuning; they measured slower than fp32 on
# SmolLM2 (decode 2.4 against 4.4 tok/s, on the build before TVM's thread pool used every core).
# Everything else takes its target's default.
TASK_DEFAULTS = {("cpu", "ort", "causal-lm"): "int4"}


def default_recipe(target, backend: str, task: str | None) -> str:
    """The preset used when no recipe is given, for a target profile, a backend and a model task."""
    return TASK_DEFAULTS.get((target.name, backend, task), target.default_recipe)


class RecipeError(KilnError):
    pass


@dataclasses.dataclass
class Recipe:
    name: str
    description: str
    steps: list[tuple[str, dict]]
    path: str | None = None
    lower: bool = True  # append the backend's lowering passes (fusions into its fast ops)
    calibration_windows: int | None = None  # None: the base recipe's, else kiln.corpus.CALIBRATION_WINDOWS

    def build(self) -> list[KilnPass]:
        passes = []
        for index, (name, params) in enumerate(self.steps):
            try:
                passes.append(create_pass(name, params))
            except UnknownPassError as exc:
                raise RecipeError(f"recipe '{printable(self.name)}', pass #{index + 1}: {exc}") from exc
        return passes

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "path": self.path, "lower": self.lower,
                "calibration_windows": self.calibration_windows,
                "passes": [{"name": n, "params": p} for n, p in self.steps]}


def presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESETS_DIR.glob("*.toml"))}


# The top-level keys of a recipe: (accepts, what it must be). Anything else is refused, so a
# misspelt key ("lowr = false") is an error rather than silently ignored.
_WHOLE = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
TOP_LEVEL = {
    "name": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    "description": (lambda v: isinstance(v, str), "a string"),
    "base": (lambda v: isinstance(v, str) and v.strip() != "", "a recipe name or path (a string)"),
    "lower": (lambda v: isinstance(v, bool), "true or false"),
    "calibration_windows": (lambda v: _WHOLE(v) and v >= 1, "a whole number >= 1"),
    "passes": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty [[passes]] list"),
}


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read(path: Path, label: str) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"recipe {label}: cannot be read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {label}: not a UTF-8 text file (byte {exc.start}); a recipe is TOML text") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {label}: invalid TOML: {exc}") from exc
    except RecursionError as exc:  # tomllib recurses into nested arrays / inline tables
        raise RecipeError(f"recipe {label}: invalid TOML: nested too deeply") from exc


def _validate(data: dict, name: str) -> None:
    """Types and ranges of the top-level keys, before any of them is used."""
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise RecipeError(f"recipe '{name}': unknown key '{printable(unknown[0])}' (a recipe has: {', '.join(TOP_LEVEL)}; "
                          f"pass parameters go under [[passes]])")
    if "passes" not in data:
        raise RecipeError(f"recipe '{name}': needs a non-empty [[passes]] list")
    for key, (accepts, what) in TOP_LEVEL.items():
        if key in data and not accepts(data[key]):
            if key == "passes":
                raise RecipeError(f"recipe '{name}': needs a non-empty [[passes]] list")
            raise RecipeError(f"recipe '{name}': '{key}' must be {what}, got {_shown(data[key])}")


def _resolve(recipe: str | Path, relative_to: Path | None = None) -> Path:
    """The file of a recipe argument: a preset's name, or a .toml path (a base's relative to its recipe)."""
    text = str(recipe)
    if text in presets():
        return presets()[text]
    path = Path(text)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.suffix != ".toml" or not path.is_file():
        raise RecipeError(
            f"unknown recipe '{printable(recipe)}' (presets: {', '.join(presets())}; or a path to a .toml file)"
        )
    return path


def load_recipe(recipe: str | Path | None, _chain: tuple[Path, ...] = (), _relative_to: Path | None = None) -> Recipe:
    """Parse and validate a recipe (preset name or .toml path); pass classes and parameters too.

    Everything is checked before any work: the TOML text, the types and ranges of every key, the
    `base` chain (a cycle is found by resolved path, however it is spelt), the pass names and each
    pass's parameters against its constructor. Every failure is a RecipeError naming the recipe.
    """
    recipe = recipe or DEFAULT
    path = _resolve(recipe, _relative_to)
    resolved = path.resolve()
    if resolved in _chain:
        names = [printable(p.name) for p in (*_chain, resolved)]
        raise RecipeError(f"recipe {names[0]}: 'base' makes a cycle ({' -> '.join(names)})")
    data = _read(path, printable(recipe if not _chain else path))
    label = printable(data["name"] if isinstance(data.get("name"), str) else path.stem)
    _validate(data, label)
    name = data.get("name", path.stem)
    entries = data["passes"]
    steps, windows = [], None
    if "base" in data:
        parent = load_recipe(data["base"], (*_chain, resolved), path.parent)
        steps, windows = list(parent.steps), parent.calibration_windows
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise RecipeError(f"recipe '{label}', pass #{index + 1}: needs a 'name' string")
        params = {k: v for k, v in entry.items() if k != "name"}
        steps.append((entry["name"], params))
    lower = data.get("lower", True)
    windows = data.get("calibration_windows", windows)
    result = Recipe(name, data.get("description", ""), steps, str(path), lower, windows)
    result.build()  # validate pass names and parameters now, before any expensive work
    return result

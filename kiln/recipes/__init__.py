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
from kiln.passes.registry import UnknownPassError, create_pass

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
                raise RecipeError(f"recipe '{self.name}', pass #{index + 1}: {exc}") from exc
        return passes

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "path": self.path, "lower": self.lower,
                "calibration_windows": self.calibration_windows,
                "passes": [{"name": n, "params": p} for n, p in self.steps]}


def presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESETS_DIR.glob("*.toml"))}


def load_recipe(recipe: str | Path | None, _bases: tuple = ()) -> Recipe:
    """Parse and validate a recipe (preset name or .toml path); pass classes are resolved too."""
    recipe = recipe or DEFAULT
    path = Path(recipe)
    if str(recipe) in presets():
        path = presets()[str(recipe)]
    elif path.suffix != ".toml" or not path.is_file():
        raise RecipeError(
            f"unknown recipe '{recipe}' (presets: {', '.join(presets())}; or a path to a .toml file)"
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {path}: invalid TOML: {exc}") from exc
    name = data.get("name", path.stem)
    entries = data.get("passes")
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"recipe '{name}': needs a non-empty [[passes]] list")
    steps, windows = [], None
    if "base" in data:
        base = data["base"]
        if not isinstance(base, str):
            raise RecipeError(f"recipe '{name}': 'base' must be a recipe name or path")
        if base in _bases or base == name:
            raise RecipeError(f"recipe '{name}': 'base' makes a cycle ({' -> '.join((*_bases, name, base))})")
        if base not in presets() and not Path(base).is_absolute():
            base = str(path.parent / base)
        parent = load_recipe(base, (*_bases, name))
        steps, windows = list(parent.steps), parent.calibration_windows
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise RecipeError(f"recipe '{name}', pass #{index + 1}: needs a 'name' string")
        params = {k: v for k, v in entry.items() if k != "name"}
        steps.append((entry["name"], params))
    lower = data.get("lower", True)
    if not isinstance(lower, bool):
        raise RecipeError(f"recipe '{name}': 'lower' must be true or false")
    windows = data.get("calibration_windows", windows)
    if windows is not None and (not isinstance(windows, int) or isinstance(windows, bool) or windows < 1):
        raise RecipeError(f"recipe '{name}': 'calibration_windows' must be a whole number >= 1")
    result = Recipe(name, data.get("description", ""), steps, str(path), lower, windows)
    result.build()  # validate pass names and parameters now, before any expensive work
    return result

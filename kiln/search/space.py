"""Search spaces: a recipe in which some values are choices.

    name = "causal-lm"
    description = "..."
    base = "fp32"                                  # as in a recipe: these passes come after the base's
    [[passes]]
    name = "smooth-activations"
    optional = true                                # each trial decides whether the pass runs
    [[passes]]
    name = "quantize-weights"
    bits = { choice = [4, 8] }                     # one of these values
    method = { choice = ["rtn", "gptq"] }
    tune_steps = 0                                 # a fixed value, as in a recipe
    variants = [{ block_size = 32 }, { block_size = 128, symmetric = false }]   # one of these sets
    [[passes]]
    name = "prune-mlp"
    optional = true
    target_params = { uniform = [0.7, 0.95] }      # a float in [lo, hi]; { int = [lo, hi] } for whole numbers

A trial's recipe is the space with every choice made: the base's passes, then these, without the
optional passes the trial turned off. It is written whole (no `base`), so `kiln compile MODEL -r
trial.toml` reproduces the trial without the space file.

The space is checked before any work: its TOML, the keys, each distribution, and every pass built
with the first value of each of its choices and each of its variants (so a misspelt parameter or an
out-of-range value is an error now, not a failed trial an hour later).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kiln.errors import KilnError
from kiln.passes.registry import UnknownPassError, create_pass, printable
from kiln.recipes import TOP_LEVEL, RecipeError, _read, load_recipe

SPACES_DIR = Path(__file__).parent / "spaces"
DISTRIBUTIONS = ("choice", "uniform", "int")
_SCALAR = (bool, int, float, str)


class SpaceError(KilnError):
    pass


@dataclasses.dataclass
class Step:
    name: str
    fixed: dict
    ranges: dict  # parameter -> (kind, values)
    variants: list[dict]
    optional: bool


@dataclasses.dataclass
class Space:
    name: str
    path: str
    base_steps: list[tuple[str, dict]]
    steps: list[Step]
    lower: bool
    calibration_windows: int | None

    def suggest(self, trial) -> dict:
        """The trial's choices, drawn through an Optuna trial (define-by-run): {key: value}."""
        for i, step in enumerate(self.steps):
            key = f"{i}:{step.name}"
            if step.optional and not trial.suggest_categorical(f"{key}.on", [True, False]):
                continue
            if step.variants:
                trial.suggest_categorical(f"{key}.variant", list(range(len(step.variants))))
            for param, (kind, values) in step.ranges.items():
                name = f"{key}.{param}"
                if kind == "choice":
                    trial.suggest_categorical(name, values)
                elif kind == "uniform":
                    trial.suggest_float(name, *values)
                else:
                    trial.suggest_int(name, *values)
        return dict(trial.params)

    def recipe(self, params: dict, name: str) -> dict:
        """The whole recipe (TOML-ready) that `params` choose."""
        passes = [{"name": n, **p} for n, p in self.base_steps]
        for i, step in enumerate(self.steps):
            key = f"{i}:{step.name}"
            if step.optional and not params.get(f"{key}.on", True):
                continue
            chosen = dict(step.fixed)
            if step.variants:
                chosen.update(step.variants[params[f"{key}.variant"]])
            chosen.update({p: params[f"{key}.{p}"] for p in step.ranges})
            passes.append({"name": step.name, **chosen})
        recipe = {"name": name, "description": f"kiln search over '{self.name}': {describe(params)}",
                  "lower": self.lower}
        if self.calibration_windows is not None:
            recipe["calibration_windows"] = self.calibration_windows
        return recipe | {"passes": passes}

    def size(self) -> float:
        """How many distinct recipes the space holds (inf with a uniform range)."""
        total = 1.0
        for step in self.steps:
            count = max(1, len(step.variants))
            for kind, values in step.ranges.values():
                count *= len(values) if kind == "choice" else values[1] - values[0] + 1 if kind == "int" else float("inf")
            total *= count + 1 if step.optional else count
        return total


def describe(params: dict) -> str:
    return ", ".join(f"{k.split(':', 1)[1]}={f'{v:.4g}' if isinstance(v, float) else v}"
                     for k, v in params.items()) or "the base recipe"


def default_space(task: str) -> Path:
    path = SPACES_DIR / f"{task}.toml"
    if not path.is_file():
        raise SpaceError(f"no default search space for a '{task}' model: give --space FILE")
    return path


def _distribution(value, where: str):
    """(kind, values) for a {choice|uniform|int = ...} table, None for a fixed value."""
    if not isinstance(value, dict):
        return None
    if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: a table value must be one of {{ choice = [...] }}, {{ uniform = [lo, hi] }}, "
                         f"{{ int = [lo, hi] }}, got {printable(str(value))[:80]}")
    kind, values = next(iter(value.items()))
    if kind == "choice":
        if not isinstance(values, list) or not values or not all(isinstance(v, _SCALAR) for v in values):
            raise SpaceError(f"{where}: choice needs a non-empty list of numbers, strings or booleans")
        if len(set(map(repr, values))) != len(values):
            raise SpaceError(f"{where}: choice lists a value twice")
        return kind, values
    number = float if kind == "uniform" else int
    if (not isinstance(values, list) or len(values) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            or (kind == "int" and not all(isinstance(v, int) for v in values)) or not values[0] < values[1]):
        raise SpaceError(f"{where}: {kind} needs [lo, hi] with lo < hi" + (" (whole numbers)" if kind == "int" else ""))
    return kind, [number(v) for v in values]


def load_space(path: str | Path) -> Space:
    """Parse and check a search space file; every failure is a SpaceError naming the file."""
    path = Path(path)
    label = printable(path.name)
    if not path.is_file():
        raise SpaceError(f"search space {label}: no such file")
    try:
        data = _read(path, label)
    except RecipeError as exc:
        raise SpaceError(str(exc).replace("recipe ", "search space ", 1)) from None
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise SpaceError(f"search space {label}: unknown key '{printable(unknown[0])}' (a space has: {', '.join(TOP_LEVEL)})")
    for key, (accepts, what) in TOP_LEVEL.items():
        if key in data and not accepts(data[key]):
            raise SpaceError(f"search space {label}: '{key}' must be {what}")
    if "passes" not in data:
        raise SpaceError(f"search space {label}: needs a non-empty [[passes]] list")
    base_steps, windows = [], None
    if "base" in data:
        try:
            base = load_recipe(data["base"], _relative_to=path.parent)
        except RecipeError as exc:
            raise SpaceError(f"search space {label}: base: {exc}") from None
        base_steps, windows = list(base.steps), base.calibration_windows
    steps = []
    for index, entry in enumerate(data["passes"]):
        where = f"search space {label}, pass #{index + 1}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise SpaceError(f"{where}: needs a 'name' string")
        optional = entry.get("optional", False)
        if not isinstance(optional, bool):
            raise SpaceError(f"{where}: 'optional' must be true or false")
        variants = entry.get("variants", [])
        if not isinstance(variants, list) or "variants" in entry and not variants or not all(
                isinstance(v, dict) and all(isinstance(x, _SCALAR) for x in v.values()) for v in variants):
            raise SpaceError(f"{where}: 'variants' must be a non-empty list of tables of fixed values")
        fixed, ranges = {}, {}
        for key, value in entry.items():
            if key in ("name", "optional", "variants"):
                continue
            dist = _distribution(value, f"{where}, '{printable(key)}'")
            if dist is None:
                fixed[key] = value
            else:
                ranges[key] = dist
        step = Step(entry["name"], fixed, ranges, variants, optional)
        first = {p: v[0] for p, (_, v) in ranges.items()}
        for variant in variants or [{}]:
            # Every value of every choice (both ends of a range), the others at their first.
            probes = [{}] + [{p: v} for p, (_, values) in ranges.items() for v in values[1:]]
            for changed in probes:
                try:
                    create_pass(step.name, {**fixed, **variant, **first, **changed})
                except (UnknownPassError, ValueError, TypeError) as exc:
                    raise SpaceError(f"{where}: {exc}") from None
        steps.append(step)
    return Space(data.get("name", path.stem), str(path), base_steps, steps, data.get("lower", True),
                 data.get("calibration_windows", windows))

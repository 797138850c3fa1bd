"""`kiln search` without Ray: spaces, their recipes, the Pareto front and every error that comes
before a trial starts (the searches themselves are in test_search.py, slow)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import tomli_w

from conftest import run_kiln
from kiln.recipes import load_recipe
from kiln.search.report import choose_best, pareto_front
from kiln.search.space import SPACES_DIR, SpaceError, load_space


def assert_one_line_error(proc, *fragments, code=1):
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "internal error" not in lines[0] and "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


BENCHMARK_SPACES = sorted((Path(__file__).parents[2] / "benchmarks" / "spaces").glob("*.toml"))


@pytest.mark.parametrize("path", [SPACES_DIR / "causal-lm.toml", SPACES_DIR / "embedding.toml", *BENCHMARK_SPACES],
                         ids=lambda p: p.stem)
def test_every_recipe_of_a_shipped_space_is_a_valid_recipe(path, tmp_path):
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for n in range(12):
        params = space.suggest(study.ask())
        seen.add(json.dumps(params, sort_keys=True))
        path = tmp_path / f"r{n}.toml"
        path.write_text(tomli_w.dumps(space.recipe(params, f"trial-{n}")))
        recipe = load_recipe(path)  # validates every pass and parameter
        names = [name for name, _ in recipe.steps]
        for key, on in params.items():
            if key.endswith(".on"):
                index, name = key[:-3].split(":", 1)
                assert (name in names) == on or name == "eliminate-dead-code", (key, names)
    assert len(seen) > 6  # the sampler explores


def test_recipe_applies_choices_variants_and_optional_passes(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("""
name = "s"
[[passes]]
name = "fold-constants"
optional = true
[[passes]]
name = "quantize-weights"
bits = { choice = [4, 8] }
method = "rtn"
variants = [{ block_size = 32 }, { block_size = 0, bits = 7 }]
[[passes]]
name = "prune-mlp"
target_params = { uniform = [0.5, 0.9] }
""")
    space = load_space(path)
    assert space.size() == float("inf")
    params = {"0:fold-constants.on": False, "1:quantize-weights.variant": 0, "1:quantize-weights.bits": 8,
              "2:prune-mlp.target_params": 0.7}
    recipe = space.recipe(params, "t")
    assert recipe["passes"] == [{"name": "quantize-weights", "method": "rtn", "block_size": 32, "bits": 8},
                                {"name": "prune-mlp", "target_params": 0.7}]
    trial = optuna.trial.FixedTrial(params)
    assert space.suggest(trial) == {k: v for k, v in params.items()}


@pytest.mark.parametrize("text, fragment", [
    ("[[passes]]\nname = 'fold-constants'\nsize_limit = { choice = [] }\n", "choice needs a non-empty list"),
    ("[[passes]]\nname = 'fold-constants'\nsize_limit = { choice = [1, 1] }\n", "lists a value twice"),
    ("[[passes]]\nname = 'prune-mlp'\ntarget_params = { uniform = [0.9, 0.5] }\n", "lo < hi"),
    ("[[passes]]\nname = 'fold-constants'\nsize_limit = { int = [1.5, 9] }\n", "whole numbers"),
    ("[[passes]]\nname = 'fold-constants'\nsize_limit = { normal = [1, 2] }\n", "a table value must be one of"),
    ("[[passes]]\nname = 'quantize-weights'\nbits = { choice = [4, 99] }\n", "pass #1"),  # every value is checked
    ("[[passes]]\nname = 'prune-mlp'\ntarget_params = { uniform = [0.5, 2.0] }\n", "target_params"),
    ("[[passes]]\nname = 'no-such-pass'\n", "unknown pass 'no-such-pass'"),
    ("[[passes]]\nname = 'fold-constants'\noptional = 'yes'\n", "'optional' must be true or false"),
    ("[[passes]]\nname = 'fold-constants'\nvariants = []\n", "'variants' must be a non-empty list"),
    ("grid = 1\n[[passes]]\nname = 'fold-constants'\n", "unknown key 'grid'"),
    ("name = 's'\n", "needs a non-empty [[passes]] list"),
    ("base = 'no-such-recipe'\n[[passes]]\nname = 'fold-constants'\n", "base: unknown recipe"),
    ("passes = [\n", "invalid TOML"),
])
def test_invalid_spaces_are_refused_before_any_work(tmp_path, text, fragment):
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(SpaceError, match="search space space.toml") as info:
        load_space(path)
    assert fragment in str(info.value)
    out = tmp_path / "out"
    assert_one_line_error(run_kiln("search", "tiny-llama", "--space", str(path), "-o", str(out)), fragment)
    assert not out.exists()


def _record(number, size, speed, ppl):
    return {"number": number, "status": "ok", "task": "causal-lm", "size_mb": size, "speed": {"decode_tok_s": speed},
            "quality": {"perplexity": 10 * (1 + ppl), "ppl_increase": ppl}}


def test_pareto_front_and_the_best_by_each_objective():
    a, b, c = _record(0, 60, 100, 0.05), _record(1, 90, 120, 0.02), _record(2, 95, 110, 0.03)  # c: dominated by b
    d = _record(3, 50, 90, 0.10)
    dup = dict(a, number=4, duplicate_of=0)
    over = dict(_record(5, 10, 500, 0.5), status="pruned")
    front = pareto_front([a, b, c, d, dup, over])
    assert [r["number"] for r in front] == [0, 1, 3]
    assert choose_best(front, "speed") is b
    assert choose_best(front, "size") is d
    assert choose_best(front, "quality") is b
    assert choose_best([], "speed") is None


@pytest.mark.parametrize("args, fragment", [
    (["--objective", "beauty"], "--objective must be one of speed, size, quality"),
    (["--max-ppl-increase", "5%", "--min-cosine", "0.99"], "give one quality budget"),
    (["--max-ppl-increase", "-1"], "must be a fraction >= 0"),
    (["--min-cosine", "3"], "must lie in [-1, 1]"),
    (["--max-size", "0MB"], "must be above 0 MB"),
    (["--time-budget", "soon"], "is not a duration like 30m"),
    (["--trial-timeout", "0s"], "must be above 0"),
    (["--corpus", "shakespeare"], "unknown corpus 'shakespeare'"),
    (["--resume"], "holds no search to resume"),
])
def test_search_options_are_checked_before_ray_starts(tmp_path, args, fragment):
    out = tmp_path / "out"
    assert_one_line_error(run_kiln("search", "tiny-llama", "-o", str(out), *args), fragment)
    assert not (out / "search.json").exists()


def test_a_size_that_is_not_one_is_a_usage_error(tmp_path):
    proc = run_kiln("search", "tiny-llama", "-o", str(tmp_path / "out"), "--max-size", "lots")
    assert_one_line_error(proc, "is not a size like 60MB", code=2)


def test_an_existing_directory_is_neither_searched_into_nor_touched(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert_one_line_error(run_kiln("search", "tiny-llama", "-o", str(tmp_path / "mine")), "already exists and is not empty")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "search.json").write_text(json.dumps({"model": "tiny-bert"}))
    assert_one_line_error(run_kiln("search", "tiny-llama", "-o", str(tmp_path / "other"), "--resume"),
                          "is a search of tiny-bert, not of tiny-llama")

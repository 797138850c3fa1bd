"""Recipes are validated before any work (issue 29, deliverable 4): the TOML text, the types and
ranges of every key, the base chain by resolved path, and every pass parameter against the pass's
constructor annotations (in one place, `KilnPass.check_parameters`, so plugin passes get it too)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_nothing_left, assert_one_line_error, run_kiln

from kiln.passes.base import KilnPass
from kiln.passes.registry import UnknownPassError, create_pass, register_pass
from kiln.recipes import RecipeError, load_recipe, presets

FOLD = '[[passes]]\nname = "fold-constants"\n'


def _recipe(tmp_path: Path, text: str | bytes, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(str(path))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_every_preset_is_valid():
    for name in presets():
        assert load_recipe(name).steps


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("name = 5\n" + FOLD, ("'name' must be a non-empty string, got 5",)),
        ('name = ""\n' + FOLD, ("'name' must be a non-empty string",)),
        ("description = [1]\n" + FOLD, ("'description' must be a string, got [1]",)),
        ('lower = "yes"\n' + FOLD, ("'lower' must be true or false, got 'yes'",)),
        ("calibration_windows = 2.5\n" + FOLD, ("'calibration_windows' must be a whole number >= 1, got 2.5",)),
        ("calibration_windows = true\n" + FOLD, ("'calibration_windows' must be a whole number >= 1, got True",)),
        ("base = 3\n" + FOLD, ("'base' must be a recipe name or path",)),
        ("passes = 3\n", ("needs a non-empty [[passes]] list",)),
        ("passes = []\n", ("needs a non-empty [[passes]] list",)),
        ('lowr = false\n' + FOLD, ("unknown key 'lowr'", "pass parameters go under [[passes]]")),
        ("size_limit = 3\n" + FOLD, ("unknown key 'size_limit'",)),
        ("when = 1979-05-27\n" + FOLD, ("unknown key 'when'",)),
        ('name = 1979-05-27\n' + FOLD, ("'name' must be a non-empty string",)),
    ],
)
def test_top_level_types_and_ranges(tmp_path, text, fragments):
    _refused(_recipe(tmp_path, text), *fragments)


@pytest.mark.parametrize(
    "params,fragments",
    [
        ('size_limit = "big"', ("pass 'fold-constants'", "parameter 'size_limit'", "a whole number (int)", "'big' (str)")),
        ("size_limit = 1.5", ("parameter 'size_limit' must be a whole number (int), got 1.5 (float)",)),
        ("size_limit = true", ("parameter 'size_limit' must be a whole number (int), got True (bool)",)),
        ("size_limit = -4", ("parameter 'size_limit' must be >= 0, got -4",)),
        ("shape_inference = 1", ("parameter 'shape_inference' must be true or false (bool), got 1 (int)",)),
        ("size_limit = [1]", ("parameter 'size_limit' must be a whole number (int), got [1] (list)",)),
        ("size_limit = {a = 1}", ("parameter 'size_limit' must be a whole number (int), got {'a': 1} (dict)",)),
    ],
)
def test_pass_parameter_types(tmp_path, params, fragments):
    message = _refused(_recipe(tmp_path, FOLD + params + "\n"), "recipe 'r', pass #1", *fragments)
    assert "invalid parameters" not in message  # the check, not the constructor's TypeError


@pytest.mark.parametrize(
    "pass_,params,fragment",
    [
        ("quantize-weights", "budget = nan", "parameter 'budget' must be a finite number, got nan"),
        ("quantize-weights", "budget = inf", "parameter 'budget' must be a finite number, got inf"),
        ("quantize-weights", "budget = -0.5", "parameter 'budget' must be >= 0, got -0.5"),
        ("quantize-weights", "budget = 1", None),  # a whole number is a fine float
        ("quantize-weights", 'method = 3', "parameter 'method' must be a string (str), got 3 (int)"),
        ("convert-float16", 'keep_fp32 = ["Softmax", 3]', "parameter 'keep_fp32' must be a list of str"),
        ("convert-float16", 'keep_fp32 = "Softmax"', "parameter 'keep_fp32' must be a list of str"),
        ("convert-float16", 'keep_fp32 = ["Softmax"]', None),
        ("drop-layers", 'drop = [1, -2]', "parameter 'drop' must be >= 0, got [1, -2]"),
        ("quantize-weights", "bits = 5", "invalid parameters: bits must be 4, 7"),  # the constructor's range
    ],
)
def test_pass_parameter_values(tmp_path, pass_, params, fragment):
    path = _recipe(tmp_path, f'[[passes]]\nname = "{pass_}"\n{params}\n')
    if fragment is None:
        assert load_recipe(str(path)).steps
    else:
        _refused(path, f"pass '{pass_}'", fragment)


def test_a_plugin_pass_gets_the_same_checks():
    @register_pass("test-recipe-validation-plugin")
    class Plugin(KilnPass):
        signed_parameters = ("offset",)

        def __init__(self, scale: float = 1.0, offset: int = 0, tags: list[str] | None = None, anything=None):
            self.scale, self.offset, self.tags, self.anything = scale, offset, tags, anything

        def call(self, model):
            return self.result(model, modified=False)

    assert create_pass("test-recipe-validation-plugin", {"offset": -3, "anything": {"x": [1]}}).offset == -3
    with pytest.raises(UnknownPassError, match=r"pass 'test-recipe-validation-plugin': parameter 'scale' must be a "
                                               r"number \(float\), got 'x' \(str\)"):
        create_pass("test-recipe-validation-plugin", {"scale": "x"})
    with pytest.raises(UnknownPassError, match="parameter 'scale' must be >= 0"):
        create_pass("test-recipe-validation-plugin", {"scale": -1.0})
    with pytest.raises(UnknownPassError, match="parameter 'tags' must be a list of str"):
        create_pass("test-recipe-validation-plugin", {"tags": [1]})


def test_unknown_pass_and_parameter_are_one_line(tmp_path):
    _refused(_recipe(tmp_path, '[[passes]]\nname = "no-such-pass"\n'), "recipe 'r', pass #1", "unknown pass 'no-such-pass'")
    _refused(_recipe(tmp_path, FOLD + "fast = true\n"), "pass 'fold-constants' has no parameter 'fast'")
    _refused(_recipe(tmp_path, '[[passes]]\nname = "simplify"\nx = 1\n'), "has no parameter 'x' (it takes: no parameters)")


def test_base_cycles_by_resolved_path(tmp_path):
    _refused(_recipe(tmp_path, 'base = "self.toml"\n' + FOLD, "self.toml"), "'base' makes a cycle (self.toml -> self.toml)")
    (tmp_path / "sub").mkdir()
    _recipe(tmp_path, 'name = "a"\nbase = "sub/b.toml"\n' + FOLD, "a.toml")
    _recipe(tmp_path / "sub", 'name = "b"\nbase = "../a.toml"\n' + FOLD, "b.toml")
    _refused(tmp_path / "a.toml", "'base' makes a cycle (a.toml -> b.toml -> a.toml)")
    # The same file by an absolute path is the same recipe.
    _recipe(tmp_path, f'base = "{tmp_path / "abs.toml"}"\n' + FOLD, "abs.toml")
    _refused(tmp_path / "abs.toml", "'base' makes a cycle")


def test_a_base_named_like_the_recipe_is_not_a_cycle(tmp_path):
    # A file recipe called "fp32" that extends the fp32 preset: different files, no cycle.
    recipe = load_recipe(str(_recipe(tmp_path, 'name = "fp32"\nbase = "fp32"\n' + FOLD)))
    assert len(recipe.steps) == len(load_recipe("fp32").steps) + 1


def test_a_missing_base_is_one_line(tmp_path):
    _refused(_recipe(tmp_path, 'base = "nowhere.toml"\n' + FOLD), "unknown recipe 'nowhere.toml'")


def test_an_invalid_base_names_the_base(tmp_path):
    _recipe(tmp_path, 'name = "parent"\n' + FOLD + 'size_limit = "big"\n', "parent.toml")
    _refused(_recipe(tmp_path, 'base = "parent.toml"\n' + FOLD), "recipe 'parent', pass #1", "parameter 'size_limit'")


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00bad", b'name = "\xc3\x28"\n', b"\x00" * 64])
def test_binary_recipe_file(tmp_path, raw):
    _refused(_recipe(tmp_path, raw), "recipe", "not a UTF-8 text file" if raw[0] != 0 else "invalid TOML")


def test_deeply_nested_toml_is_one_line(tmp_path):
    _refused(_recipe(tmp_path, "x = " + "[" * 5000 + "]" * 5000 + "\n" + FOLD), "recipe")


def test_unreadable_recipe_is_one_line(tmp_path):
    path = _recipe(tmp_path, FOLD)
    path.chmod(0)
    try:
        if path.read_bytes() is not None:  # root reads anything: nothing to test
            pytest.skip("running as root")
    except PermissionError:
        _refused(path, "cannot be read")
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("name = 5\n" + FOLD, "'name' must be a non-empty string, got 5"),
        (FOLD + 'size_limit = "big"\n', "pass 'fold-constants': parameter 'size_limit' must be a whole number (int), got 'big' (str)"),
        ('base = "r.toml"\n' + FOLD, "'base' makes a cycle (r.toml -> r.toml)"),
        (b"\xff\xfe\x00bad", "not a UTF-8 text file"),
    ],
)
def test_compile_refuses_before_any_work(tmp_path, text, fragment):
    recipe = _recipe(tmp_path, text)
    proc = run_kiln("compile", "tiny-llama", "-r", str(recipe), "-o", str(tmp_path / "out"), timeout=120)
    assert_one_line_error(proc, fragment)
    assert "internal error" not in proc.stderr
    assert_nothing_left(tmp_path, "out")


@pytest.mark.parametrize(
    "text,fragment",
    [  # found by tests/kiln/test_fuzz.py: a name from the recipe printed raw broke the one-line error
        ('[[passes]]\nname = "\\n"\n', "unknown pass '\\n'"),
        (FOLD + '"a\\nb" = 1\n', "has no parameter 'a\\nb'"),
        ('"x\\ny" = 1\n' + FOLD, "unknown key 'x\\ny'"),
        ('name = "two\\nlines"\n[[passes]]\nname = "nope"\n', "recipe 'two\\nlines', pass #1"),
        ('name = "two\\nlines"\n[[passes]]\nsize_limit = 1\n', "recipe 'two\\nlines', pass #1: needs a 'name'"),
        ('base = "a\\nb"\n' + FOLD, "unknown recipe '"),
    ],
)
def test_names_from_the_recipe_stay_on_one_line(tmp_path, text, fragment):
    _refused(_recipe(tmp_path, text), fragment)

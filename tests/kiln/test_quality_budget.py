"""Quality budgets at compile time: measured after every lossy pass, the pass that spends
the budget is named, and nothing is written when it is exceeded."""

import kiln
import pytest

from conftest import run_kiln
from test_cli_errors import assert_nothing_left, assert_one_line_error


@pytest.mark.slow  # the calibration and evaluation texts (gensim wheel)
def test_loose_budget_records_quality_per_lossy_pass(tmp_path):
    result = kiln.compile("tiny-llama", tmp_path / "a", recipe="int4", max_ppl_increase=10.0, progress=False)
    budget = result.manifest["compile"]["quality_budget"]
    assert budget["metric"] == "ppl_increase" and budget["limit"] == 10.0
    assert budget["source"]["ppl_increase"] == 0.0 and budget["source"]["ppl"] > 1
    quant = next(r for r in result.manifest["passes"] if r["name"] == "quantize-weights")
    assert quant["quality"]["ppl"] != budget["source"]["ppl"]  # int4 moves the perplexity
    assert "quality" not in next(r for r in result.manifest["passes"] if r["name"] == "fold-constants")
    assert budget["final"] == [r for r in result.manifest["passes"] if "quality" in r][-1]["quality"]


BOOST = 'name = "boost"\nbase = "fp32"\n[[passes]]\nname = "boost-token"\n'


@pytest.mark.slow  # pip-installs the plugin package
def test_exceeded_budget_names_the_pass_and_writes_nothing(tmp_path, plugin_path):
    """A lossy plugin pass that piles probability on one token must spend any budget."""
    recipe = tmp_path / "boost.toml"
    recipe.write_text(BOOST)
    proc = run_kiln("compile", "tiny-llama", "-r", str(recipe), "-o", str(tmp_path / "a"),
                    "--max-ppl-increase", "5%", env={"PYTHONPATH": str(plugin_path)})
    assert_one_line_error(proc, "pass 'boost-token'", "perplexity +", "exceeds --max-ppl-increase 5.00%")
    assert_nothing_left(tmp_path, "a")


@pytest.mark.slow  # calibrated int8 with the budget measured per pass: about 100 s of CPU
def test_encoder_cosine_budget(tmp_path):
    result = kiln.compile("tiny-bert", tmp_path / "ok", recipe="int4", min_cosine=0.5, progress=False)
    assert 0.5 < result.manifest["compile"]["quality_budget"]["final"]["cosine"] < 1.0
    proc = run_kiln("compile", "tiny-bert", "-r", "int4", "-o", str(tmp_path / "bad"), "--min-cosine", "0.9999999")
    assert_one_line_error(proc, "quantize-weights", "mean cosine", "below --min-cosine")
    assert_nothing_left(tmp_path, "bad")


@pytest.mark.parametrize("args, fragment", [
    (["tiny-bert", "--max-ppl-increase", "5%"], "needs a causal LM"),
    (["tiny-llama", "--min-cosine", "0.9"], "--min-cosine is for encoders"),
    (["tiny-llama", "--max-ppl-increase", "-1"], "must be a fraction >= 0"),
    (["tiny-llama", "--max-ppl-increase", "5%", "--min-cosine", "0.9"], "give one quality budget"),
])
def test_invalid_budgets(tmp_path, args, fragment):
    proc = run_kiln("compile", *args, "-o", str(tmp_path / "a"))
    assert_one_line_error(proc, fragment)
    assert_nothing_left(tmp_path, "a")


def test_budget_that_is_not_a_number(tmp_path):
    proc = run_kiln("compile", "tiny-llama", "-o", str(tmp_path / "a"), "--max-ppl-increase", "lots")
    assert proc.returncode != 0 and "not a number or a percentage" in proc.stderr
    assert "Traceback" not in proc.stderr

import numpy as np
import onnx_ir as ir
import pytest

from conftest import tiny_graph
from kiln.passes import KilnPass, PipelineError, run_pipeline
from kiln.passes.eliminate_dead_code import EliminateDeadCodePass
from kiln.passes.fold_constants import FoldConstantsPass

FEEDS = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}


class ScaleWeights(KilnPass):
    """Multiplies W by `factor`: exact only when factor == 1."""

    name = "scale-weights"

    def __init__(self, factor: float = 1.0, exact: bool = True, metric: str = "max_rel", budget: float = 1e-4):
        super().__init__()
        self.factor = factor
        self.exact, self.metric, self.budget = exact, metric, budget

    def call(self, model):
        w = model.graph.initializers["W"]
        w.const_value = ir.tensor(w.const_value.numpy() * self.factor, name="W")
        return self.result(model, modified=True, stats={"scaled": 1})


class ReturnsPlainResult(KilnPass):
    name = "plain-result"

    def call(self, model):
        return ir.passes.PassResult(model, False)


class LiesAboutModified(KilnPass):
    name = "liar"

    def call(self, model):
        relu = list(model.graph)[-1]
        neg = ir.node("Neg", [relu.outputs[0]], num_outputs=1)
        model.graph.append(neg)
        return self.result(model, modified=False)


class BreaksTheGraph(KilnPass):
    name = "breaker"

    def call(self, model):
        relu = list(model.graph)[-1]
        relu.replace_input_with(0, ir.val("nowhere", ir.DataType.FLOAT, ir.Shape(["N", 3])))
        return self.result(model, modified=True)


class Raises(KilnPass):
    name = "raiser"

    def call(self, model):
        raise ValueError("boom")


def test_records_every_pass():
    records = run_pipeline(tiny_graph(), [FoldConstantsPass(), ScaleWeights(1.0), EliminateDeadCodePass()],
                           FEEDS, progress=False).records
    assert [r["name"] for r in records] == ["fold-constants", "scale-weights", "eliminate-dead-code"]
    for r in records:
        assert set(r) >= {"name", "params", "modified", "stats", "seconds", "delta"}
    assert records[1]["params"] == {"factor": 1.0, "exact": True, "metric": "max_rel", "budget": 1e-4}
    assert records[1]["stats"] == {"scaled": 1}
    assert records[1]["delta"]["max_rel"] == 0.0


def test_exact_pass_that_changes_outputs_stops_the_pipeline_naming_it():
    with pytest.raises(PipelineError, match=r"pass 'scale-weights' \(after eliminate-dead-code\): exact pass changed the outputs"):
        run_pipeline(tiny_graph(), [EliminateDeadCodePass(), ScaleWeights(1.01)], FEEDS, progress=False)


def test_lossy_pass_within_budget_records_its_metric():
    records = run_pipeline(tiny_graph(), [ScaleWeights(1.001, exact=False, metric="cosine", budget=0.999)],
                           FEEDS, progress=False).records
    assert records[0]["delta"]["cosine"] > 0.999
    assert records[0]["delta"]["max_rel"] > 1e-4  # would fail as an exact pass


def test_lossy_pass_over_budget_fails():
    with pytest.raises(PipelineError, match="lossy pass exceeded its budget: max_rel"):
        run_pipeline(tiny_graph(), [ScaleWeights(1.5, exact=False, metric="max_rel", budget=0.01)], FEEDS, progress=False)


def test_delta_total_accumulates_over_lossy_passes():
    lossy = dict(exact=False, metric="max_rel", budget=0.05)
    records = run_pipeline(tiny_graph(), [ScaleWeights(1.01, **lossy), ScaleWeights(1.01, **lossy)], FEEDS, progress=False).records
    assert records[1]["delta_total"]["max_rel"] > records[1]["delta"]["max_rel"]


@pytest.mark.parametrize(
    "bad, message",
    [
        (ReturnsPlainResult(), "broke the contract: returned PassResult"),
        (LiesAboutModified(), "reported modified=False but changed the graph"),
        (BreaksTheGraph(), "produced an invalid model: dangling value"),
        (Raises(), "failed: ValueError: boom"),
    ],
)
def test_contract_violations_name_the_pass(bad, message):
    with pytest.raises(PipelineError, match=f"pass '{bad.name}' \\(first pass\\).*{message}"):
        run_pipeline(tiny_graph(), [bad], FEEDS, progress=False)


def test_without_samples_the_check_is_recorded_as_skipped():
    records = run_pipeline(tiny_graph(), [ScaleWeights(2.0)], None, progress=False).records
    assert records[0]["delta"] is None

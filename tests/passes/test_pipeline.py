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


def _cancelling_graph() -> ir.Model:
    """y = (x·W + C1) - C2 with C1 = C2 = 1e5: float32 rounding of the large constants dominates y."""
    rng = np.random.default_rng(0)
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["N", 4]))
    w = ir.val("W", const_value=ir.tensor(rng.standard_normal((4, 3)).astype(np.float32), name="W"))
    c1 = ir.val("C1", const_value=ir.tensor(np.full(3, 1e5 + 0.3, np.float32), name="C1"))
    c2 = ir.val("C2", const_value=ir.tensor(np.full(3, 1e5 + 0.3, np.float32), name="C2"))
    mm = ir.node("MatMul", [x, w], num_outputs=1)
    add = ir.node("Add", [mm.outputs[0], c1], num_outputs=1)
    sub = ir.node("Sub", [add.outputs[0], c2], num_outputs=1)
    for v in (mm.outputs[0], add.outputs[0], sub.outputs[0]):
        v.dtype, v.shape = ir.DataType.FLOAT, ir.Shape(["N", 3])
    sub.outputs[0].name = "y"
    return ir.Model(ir.Graph([x], [sub.outputs[0]], nodes=[mm, add, sub], initializers=[w, c1, c2],
                             opset_imports={"": 21}, name="g"), ir_version=10)


class CancelFirst(KilnPass):
    """(m + C1) - C2 -> m + (C1 - C2): the same value, rounded differently (here: not at all)."""

    name = "cancel-first"

    def call(self, model):
        mm, add, sub = list(model.graph)
        c1, c2 = add.inputs[1], sub.inputs[1]
        diff = ir.node("Sub", [c1, c2], num_outputs=1)
        total = ir.node("Add", [mm.outputs[0], diff.outputs[0]], num_outputs=1)
        diff.outputs[0].dtype, diff.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([3])
        total.outputs[0].dtype, total.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(["N", 3])
        ir.convenience.replace_nodes_and_values(model.graph, sub, [add, sub], [diff, total],
                                                [sub.outputs[0]], [total.outputs[0]])
        return self.result(model, modified=True)


def test_exact_budget_follows_a_model_that_amplifies_rounding():
    records = run_pipeline(_cancelling_graph(), [CancelFirst()], FEEDS, progress=False).records
    record = records[0]
    assert record["delta"]["max_rel"] > 1e-4  # over the fixed budget: rounding of 1e5 in a result of size ~3
    assert record["rounding_noise"] > 1e-4 and record["budget"] == pytest.approx(10 * record["rounding_noise"], rel=1e-3)
    # a well-conditioned model keeps the fixed budget: a 1% change is still caught
    with pytest.raises(PipelineError, match=r"exact pass changed the outputs: max_rel [0-9.e-]+ vs budget 0.0001$"):
        run_pipeline(tiny_graph(), [ScaleWeights(1.01)], FEEDS, progress=False)


def test_large_weights_reach_ort_in_memory_and_the_model_is_untouched():
    """run_ort and the verifier leave weights over 1 MB out of the serialized proto (ORT gets them
    as OrtValues); the numbers are the model's and its weights stay in place."""
    import onnx_ir as ir

    from kiln.ir import verify, without_weights
    from kiln.passes.numerics import run_ort

    rng = np.random.default_rng(0)
    big = rng.standard_normal((512, 600)).astype(np.float32)  # 1.2 MB
    w = ir.val("W", const_value=ir.tensor(big))
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2, 512]))
    mm = ir.node("MatMul", [x, w], num_outputs=1)
    mm.outputs[0].name, mm.outputs[0].dtype, mm.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape([2, 600])
    model = ir.Model(ir.Graph([x], mm.outputs, nodes=[mm], initializers=[w], opset_imports={"": 21}, name="g"),
                     ir_version=10)
    proto, weights = without_weights(model)
    assert list(weights) == ["W"] and proto.ByteSize() < 10_000
    verify(model)
    feed = rng.standard_normal((2, 512)).astype(np.float32)
    np.testing.assert_allclose(run_ort(model, {"x": feed})["y"], feed @ big, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), big)


def test_a_source_graph_ort_cannot_run_is_one_error():
    """bfloat16 arithmetic (Falcon's ALiBi export) has no ORT CPU kernel: one line, before any pass."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    cast = ir.node("Cast", [x], attributes={"to": ir.DataType.BFLOAT16}, num_outputs=1)
    mul = ir.node("Mul", [cast.outputs[0], cast.outputs[0]], num_outputs=1)
    back = ir.node("Cast", [mul.outputs[0]], attributes={"to": ir.DataType.FLOAT}, num_outputs=1)
    back.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], [back.outputs[0]], nodes=[cast, mul, back], opset_imports={"": 21}), ir_version=10)
    with pytest.raises(PipelineError, match="the source graph does not run in ONNX Runtime") as err:
        run_pipeline(model, [FoldConstantsPass()], FEEDS, progress=False)
    assert "\n" not in str(err.value)


def test_the_checkpoint_runs_before_the_first_lossy_pass():
    seen = []
    run = run_pipeline(tiny_graph(), [EliminateDeadCodePass(), ScaleWeights(1.001, exact=False, budget=0.1)], FEEDS,
                       progress=False, checkpoint=lambda model, done: seen.append(list(done)) or "checked")
    assert seen == [["eliminate-dead-code"]] and run.checkpoint == "checked"
    run = run_pipeline(tiny_graph(), [EliminateDeadCodePass()], FEEDS, progress=False,
                       checkpoint=lambda model, done: seen.append(list(done)))
    assert seen[-1] == ["eliminate-dead-code"]  # all exact: after the last pass


def test_a_metric_the_outputs_do_not_have_is_one_error():
    """KL needs a distribution: a one-column (regression) output has none."""
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["N", 1]))
    w = ir.val("W", const_value=ir.tensor(np.ones((1, 1), np.float32)))
    mm = ir.node("MatMul", [x, w], num_outputs=1)
    mm.outputs[0].name, mm.outputs[0].dtype, mm.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape(["N", 1])
    graph = ir.Graph([x], [mm.outputs[0]], nodes=[mm], initializers=[w], opset_imports={"": 21}, name="g")
    with pytest.raises(PipelineError, match="metric 'kl' is not defined for this model's outputs"):
        run_pipeline(ir.Model(graph, ir_version=10), [ScaleWeights(1.5, exact=False, metric="kl", budget=1.0)],
                     {"x": np.ones((2, 1), np.float32)}, progress=False)

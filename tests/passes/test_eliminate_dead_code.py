import numpy as np
import onnx_ir as ir

from conftest import assert_same_outputs, tiny_graph
from kiln.passes.eliminate_dead_code import EliminateDeadCodePass


def _with_dead_branch() -> ir.Model:
    model = tiny_graph()
    x = model.graph.inputs[0]
    unused = ir.val("unused_w", const_value=ir.tensor(np.ones((4, 4), dtype=np.float32)))
    model.graph.register_initializer(unused)
    dead1 = ir.node("MatMul", [x, unused], num_outputs=1)
    dead2 = ir.node("Tanh", [dead1.outputs[0]], num_outputs=1)
    model.graph.extend([dead1, dead2])
    return model


def test_removes_dead_nodes_and_initializers():
    model = _with_dead_branch()
    before = ir.from_proto(ir.to_proto(model))
    result = EliminateDeadCodePass()(model)
    assert result.modified
    assert result.stats == {"nodes_removed": 2, "initializers_removed": 1, "functions_removed": 0, "outputs_dropped": 0}
    assert [n.op_type for n in model.graph] == ["MatMul", "Add", "Relu"]
    assert_same_outputs(before, model, {"x": np.ones((3, 4), dtype=np.float32)})
    assert not EliminateDeadCodePass()(model).modified


def test_keeps_live_graph_and_unused_inputs():
    model = tiny_graph()
    model.graph.inputs.append(ir.val("spare", ir.DataType.FLOAT, ir.Shape([1])))
    result = EliminateDeadCodePass()(model)
    assert not result.modified  # reason: everything reaches an output; inputs are a contract
    assert [v.name for v in model.graph.inputs] == ["x", "spare"]


def _skip_norm_model() -> ir.Model:
    """y = SkipSimplifiedLayerNormalization(a, b, g) with all four outputs named; the sum feeds z."""
    a = ir.val("a", ir.DataType.FLOAT, ir.Shape([2, 8]))
    b = ir.val("b", ir.DataType.FLOAT, ir.Shape([2, 8]))
    g = ir.val("g", const_value=ir.tensor(np.linspace(0.5, 1.5, 8, dtype=np.float32)))
    norm = ir.node("SkipSimplifiedLayerNormalization", [a, b, g], domain="com.microsoft", num_outputs=4,
                   attributes={"epsilon": 1e-5})
    for value, name in zip(norm.outputs, ("y", "mean", "inv_std", "sum")):
        value.name = name
    relu = ir.node("Relu", [norm.outputs[3]], num_outputs=1)
    relu.outputs[0].name = "z"
    graph = ir.Graph([a, b], [norm.outputs[0], relu.outputs[0]], nodes=[norm, relu], initializers=[g],
                     opset_imports={"": 21, "com.microsoft": 1})
    return ir.Model(graph, ir_version=10)


def test_drops_unused_optional_outputs_of_contrib_ops():
    model = _skip_norm_model()
    before = ir.from_proto(ir.to_proto(model))
    result = EliminateDeadCodePass()(model)
    assert result.modified and result.stats["outputs_dropped"] == 2
    norm = next(iter(model.graph))
    assert [v.name for v in norm.outputs] == ["y", "", "", "sum"]  # the used sum keeps its slot
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((2, 8), dtype=np.float32), "b": rng.standard_normal((2, 8), dtype=np.float32)}
    assert_same_outputs(before, model, feeds, rtol=1e-6)
    assert not EliminateDeadCodePass()(model).modified


def test_trailing_unused_optional_outputs_are_cut():
    model = _skip_norm_model()
    relu = list(model.graph)[1]
    model.graph.outputs.pop()  # z is no longer an output: Relu dies, then the sum is unused too
    result = EliminateDeadCodePass()(model)
    assert result.stats["nodes_removed"] == 1 and result.stats["outputs_dropped"] == 3
    assert [v.name for v in next(iter(model.graph)).outputs] == ["y"]
    assert relu not in list(model.graph)

import numpy as np
import onnx_ir as ir

from conftest import assert_same_outputs, tiny_graph
from kiln.passes.numerics import compare, run_ort
from kiln.passes.simplify import SimplifyPass


def _with_identity_chain() -> ir.Model:
    model = tiny_graph()
    relu = list(model.graph)[-1]
    i1 = ir.node("Identity", [relu.outputs[0]], num_outputs=1)
    i2 = ir.node("Identity", [i1.outputs[0]], num_outputs=1)
    tanh = ir.node("Tanh", [i2.outputs[0]], num_outputs=1)
    for n in (i1, i2, tanh):
        n.outputs[0].dtype, n.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(["N", 3])
    model.graph.extend([i1, i2, tanh])
    tanh.outputs[0].name = "z"
    model.graph.outputs[0] = tanh.outputs[0]
    return model


def test_removes_identity_chain():
    model = _with_identity_chain()
    before = ir.from_proto(ir.to_proto(model))
    result = SimplifyPass()(model)
    assert result.modified
    assert result.stats["identities_removed"] == 2
    assert "Identity" not in [n.op_type for n in model.graph]
    assert_same_outputs(before, model, {"x": np.ones((2, 4), dtype=np.float32)})
    assert not SimplifyPass()(model).modified


def test_nothing_to_simplify():
    model = tiny_graph()
    result = SimplifyPass()(model)
    assert not result.modified  # reason: no rule matches MatMul/Add/Relu
    assert result.stats["rewrites"] == 0


def test_mul_by_one_is_removed_by_a_rewrite_rule():
    model = tiny_graph()
    relu = list(model.graph)[-1]
    one = ir.val("one", const_value=ir.tensor(np.array(1.0, dtype=np.float32)))
    model.graph.register_initializer(one)
    mul = ir.node("Mul", [relu.outputs[0], one], num_outputs=1)
    tanh = ir.node("Tanh", [mul.outputs[0]], num_outputs=1)
    for n in (mul, tanh):
        n.outputs[0].dtype, n.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(["N", 3])
    model.graph.extend([mul, tanh])
    tanh.outputs[0].name = "z"
    model.graph.outputs[0] = tanh.outputs[0]
    result = SimplifyPass()(model)
    assert result.stats["rewrites"] == 1
    assert [n.op_type for n in model.graph] == ["MatMul", "Add", "Relu", "Tanh"]


def _reshape_pair(first, second):
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["B", "S", 12]))
    s1 = ir.val("s1", const_value=ir.tensor(np.array(first, dtype=np.int64)))
    s2 = ir.val("s2", const_value=ir.tensor(np.array(second, dtype=np.int64)))
    r1 = ir.node("Reshape", [x, s1], num_outputs=1)
    r2 = ir.node("Reshape", [r1.outputs[0], s2], num_outputs=1)
    relu = ir.node("Relu", [r2.outputs[0]], num_outputs=1)
    relu.outputs[0].name, relu.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([x], [relu.outputs[0]], nodes=[r1, r2, relu], initializers=[s1, s2], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_a_reshape_round_trip_to_the_same_shape_disappears():
    model = _reshape_pair([0, 0, 3, 4], [0, 0, -1])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 12)).astype(np.float32)}
    before = run_ort(model, feeds)
    assert SimplifyPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Relu"]
    assert compare(before, run_ort(model, feeds))["max_abs"] == 0.0


def test_a_reshape_round_trip_to_another_shape_stays():
    model = _reshape_pair([0, 0, 3, 4], [0, -1, 4])  # [B, S, 12] -> [B, S, 3, 4] -> [B, 3·S, 4]
    SimplifyPass()(model)
    assert "Reshape" in [n.op_type for n in model.graph]


def _reshape_pair_computed(middle_dims, allowzero=1):
    """x[B, S, 12] -> Reshape(x, Concat(Shape(x)[:2], tail), allowzero) -> Reshape(·, [0, 0, -1]): the
    first target is computed at run time (as exporters write it), its result annotated."""
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["B", "S", 12]))
    tail = ir.val("tail", const_value=ir.tensor(np.array(middle_dims[2:], dtype=np.int64)))
    flat = ir.val("flat", const_value=ir.tensor(np.array([0, 0, -1], dtype=np.int64)))
    shape = ir.node("Shape", [x], attributes={"start": 0, "end": 2}, num_outputs=1)
    target = ir.node("Concat", [shape.outputs[0], tail], attributes={"axis": 0}, num_outputs=1)
    r1 = ir.node("Reshape", [x, target.outputs[0]], attributes={"allowzero": allowzero}, num_outputs=1)
    r1.outputs[0].dtype, r1.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(middle_dims)
    r2 = ir.node("Reshape", [r1.outputs[0], flat], num_outputs=1)
    relu = ir.node("Relu", [r2.outputs[0]], num_outputs=1)
    relu.outputs[0].name, relu.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([x], [relu.outputs[0]], nodes=[shape, target, r1, r2, relu], initializers=[tail, flat],
                     opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_a_round_trip_through_a_computed_shape_disappears():
    model = _reshape_pair_computed(["B", "S", 3, 4])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 12)).astype(np.float32)}
    before = run_ort(model, feeds)
    assert SimplifyPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Relu"]
    assert compare(before, run_ort(model, feeds))["max_abs"] == 0.0
    # an annotated middle shape that does not keep [B, S] is not a round trip
    model = _reshape_pair_computed(["S", "B", 3, 4])
    SimplifyPass()(model)
    assert "Reshape" in [n.op_type for n in model.graph]

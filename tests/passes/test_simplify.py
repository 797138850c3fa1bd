import numpy as np
import onnx_ir as ir

from conftest import assert_same_outputs, tiny_graph
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

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
    assert result.stats == {"nodes_removed": 2, "initializers_removed": 1, "functions_removed": 0}
    assert [n.op_type for n in model.graph] == ["MatMul", "Add", "Relu"]
    assert_same_outputs(before, model, {"x": np.ones((3, 4), dtype=np.float32)})
    assert not EliminateDeadCodePass()(model).modified


def test_keeps_live_graph_and_unused_inputs():
    model = tiny_graph()
    model.graph.inputs.append(ir.val("spare", ir.DataType.FLOAT, ir.Shape([1])))
    result = EliminateDeadCodePass()(model)
    assert not result.modified  # reason: everything reaches an output; inputs are a contract
    assert [v.name for v in model.graph.inputs] == ["x", "spare"]

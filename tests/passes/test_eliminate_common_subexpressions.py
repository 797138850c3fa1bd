import numpy as np
import onnx_ir as ir

from conftest import assert_same_outputs
from kiln.passes.eliminate_common_subexpressions import EliminateCommonSubexpressionsPass


def _twins(alpha_b: float) -> ir.Model:
    """y = LeakyRelu(x, a) + LeakyRelu(x, b)."""
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["N"]))
    a = ir.node("LeakyRelu", [x], attributes={"alpha": 0.1}, num_outputs=1)
    b = ir.node("LeakyRelu", [x], attributes={"alpha": alpha_b}, num_outputs=1)
    add = ir.node("Add", [a.outputs[0], b.outputs[0]], num_outputs=1)
    for n in (a, b, add):
        n.outputs[0].dtype, n.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(["N"])
    add.outputs[0].name = "y"
    g = ir.Graph([x], [add.outputs[0]], nodes=[a, b, add], opset_imports={"": 21}, name="g")
    return ir.Model(g, ir_version=10)


def test_merges_identical_nodes():
    model = _twins(0.1)
    before = ir.from_proto(ir.to_proto(model))
    result = EliminateCommonSubexpressionsPass()(model)
    assert result.modified and result.stats["nodes_merged"] == 1
    add = list(model.graph)[-1]
    assert add.inputs[0] is add.inputs[1]
    assert_same_outputs(before, model, {"x": np.linspace(-1, 1, 7, dtype=np.float32)})
    assert not EliminateCommonSubexpressionsPass()(model).modified


def test_different_attributes_are_not_merged():
    model = _twins(0.2)
    result = EliminateCommonSubexpressionsPass()(model)
    assert not result.modified  # reason: alpha differs
    assert len(list(model.graph)) == 3


def test_merges_duplicate_small_constants_on_tiny_llama(tiny_llama_ir, tiny_llama_feeds):
    before = ir.from_proto(ir.to_proto(tiny_llama_ir))
    result = EliminateCommonSubexpressionsPass()(tiny_llama_ir)
    assert result.stats["nodes_merged"] > 0
    assert_same_outputs(before, tiny_llama_ir, tiny_llama_feeds)

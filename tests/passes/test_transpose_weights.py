"""transpose-weights: a tied table read through a Transpose is stored once, transposed, exactly."""

import numpy as np
import onnx_ir as ir

from conftest import assert_same_outputs
from kiln.ir import verify
from kiln.passes import create_pass


def _tied(extra_reader: bool = False) -> ir.Model:
    """logits = MatMul(Gather(W, ids) + x, Transpose(W)), W [V=12, H=8]; optionally W also read by a Mul."""
    rng = np.random.default_rng(0)
    w = ir.val("W", const_value=ir.tensor(rng.standard_normal((12, 8)).astype(np.float32)))
    ids = ir.val("ids", ir.DataType.INT64, ir.Shape(["B", "S"]))
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["B", "S", 8]))
    gather = ir.node("Gather", [w, ids], attributes={"axis": 0}, num_outputs=1)
    add = ir.node("Add", [gather.outputs[0], x], num_outputs=1)
    transpose = ir.node("Transpose", [w], attributes={"perm": [1, 0]}, num_outputs=1)
    matmul = ir.node("MatMul", [add.outputs[0], transpose.outputs[0]], num_outputs=1)
    matmul.outputs[0].name, matmul.outputs[0].dtype = "logits", ir.DataType.FLOAT
    matmul.outputs[0].shape = ir.Shape(["B", "S", 12])
    nodes, outputs = [gather, add, transpose, matmul], [matmul.outputs[0]]
    if extra_reader:
        mul = ir.node("Mul", [w, w], num_outputs=1)
        mul.outputs[0].name, mul.outputs[0].dtype = "squares", ir.DataType.FLOAT
        nodes.append(mul)
        outputs.append(mul.outputs[0])
    graph = ir.Graph([ids, x], outputs, nodes=nodes, initializers=[w], opset_imports={"": 21}, name="tied")
    return ir.Model(graph, ir_version=10)


def test_tied_table_is_stored_once_transposed():
    model = _tied()
    before = ir.from_proto(ir.to_proto(model))
    result = create_pass("transpose-weights")(model)
    verify(model)
    assert result.stats == {"weights_transposed": 1, "gathers_rewritten": 1}
    assert [tuple(v.shape) for v in model.graph.initializers.values()] == [(8, 12)]
    rng = np.random.default_rng(1)
    feeds = {"ids": rng.integers(0, 12, (2, 5)), "x": rng.standard_normal((2, 5, 8)).astype(np.float32)}
    assert_same_outputs(before, model, feeds, rtol=0)
    assert not create_pass("transpose-weights")(model).modified


def test_other_readers_keep_the_original():
    model = _tied(extra_reader=True)
    before = ir.from_proto(ir.to_proto(model))
    create_pass("transpose-weights")(model)
    assert sorted(tuple(v.shape) for v in model.graph.initializers.values()) == [(8, 12), (12, 8)]
    rng = np.random.default_rng(2)
    feeds = {"ids": rng.integers(0, 12, (1, 3)), "x": rng.standard_normal((1, 3, 8)).astype(np.float32)}
    assert_same_outputs(before, model, feeds, rtol=0)

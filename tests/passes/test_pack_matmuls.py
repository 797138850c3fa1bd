import numpy as np
import onnx_ir as ir
import pytest

from conftest import assert_same_outputs
from kiln.ir import load_model, summary, verify
from kiln.models import sample_inputs
from kiln.passes import create_pass, run_pipeline
from kiln.passes.pack_matmuls import PackMatMulsPass


def _three_heads(shared: bool = True) -> ir.Model:
    """y_i = x_i @ W_i for i in 0..2 (x_i all the same value when `shared`)."""
    rng = np.random.default_rng(0)
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["B", 8]))
    other = ir.val("x2", ir.DataType.FLOAT, ir.Shape(["B", 8]))
    nodes, outs, inits = [], [], []
    for i, width in enumerate((4, 6, 4)):
        w = ir.val(f"W{i}", const_value=ir.tensor(rng.standard_normal((8, width)).astype(np.float32)))
        inits.append(w)
        a = x if shared or i < 2 else other
        mm = ir.node("MatMul", [a, w], num_outputs=1)
        mm.outputs[0].name, mm.outputs[0].dtype, mm.outputs[0].shape = f"y{i}", ir.DataType.FLOAT, ir.Shape(["B", width])
        nodes.append(mm)
        outs.append(mm.outputs[0])
    g = ir.Graph([x, other], outs, nodes=nodes, initializers=inits, opset_imports={"": 21}, name="g")
    return ir.Model(g, ir_version=10)


def test_packs_matmuls_on_one_activation():
    model = _three_heads()
    before = ir.from_proto(ir.to_proto(model))
    result = PackMatMulsPass()(model)
    verify(model)
    assert result.stats == {"groups": 1, "matmuls_packed": 3}
    assert [n.op_type for n in model.graph] == ["MatMul", "Split"]
    assert [v.name for v in model.graph.outputs] == ["y0", "y1", "y2"]
    feeds = {"x": np.ones((2, 8), dtype=np.float32), "x2": np.zeros((2, 8), dtype=np.float32)}
    assert_same_outputs(before, model, feeds, rtol=1e-6)
    assert not PackMatMulsPass()(model).modified


def test_biases_pack_with_their_matmuls():
    """y_i = x @ W_i + b_i -> Split(Add(MatMul(x, Wcat), bcat)); a group where one MatMul has no
    bias keeps its Adds."""
    for with_bias in ((True, True, True), (True, False, True)):
        model = _three_heads()
        rng = np.random.default_rng(1)
        graph = model.graph
        for i, (mm, biased) in enumerate(zip(list(graph), with_bias)):
            if not biased:
                continue
            b = ir.val(f"b{i}", const_value=ir.tensor(rng.standard_normal(mm.inputs[1].shape[1]).astype(np.float32)))
            graph.register_initializer(b)
            add = ir.node("Add", [mm.outputs[0], b], num_outputs=1)
            graph.insert_after(mm, add)
            name, mm.outputs[0].name = mm.outputs[0].name, f"{mm.outputs[0].name}.mm"
            add.outputs[0].name, add.outputs[0].dtype, add.outputs[0].shape = name, mm.outputs[0].dtype, mm.outputs[0].shape
            graph.outputs[i] = add.outputs[0]
        before = ir.from_proto(ir.to_proto(model))
        PackMatMulsPass()(model)
        verify(model)
        ops = [n.op_type for n in model.graph]
        assert ops == (["MatMul", "Add", "Split"] if all(with_bias) else ["MatMul", "Split", "Add", "Add"])
        feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32), "x2": np.zeros((2, 8), dtype=np.float32)}
        assert_same_outputs(before, model, feeds, rtol=1e-6)


def test_different_activations_are_not_packed():
    model = _three_heads(shared=False)
    result = PackMatMulsPass(min_group=3)(model)
    assert not result.modified  # reason: only two MatMuls read x
    assert result.stats["groups"] == 0


def test_packs_qkv_and_gate_up_of_every_layer(prepared):
    p = prepared("tiny-qwen2")  # q/k/v with biases
    model = load_model(p.path)
    feeds = sample_inputs(p.meta, summary(model).inputs)
    run = run_pipeline(model, [create_pass(n) for n in ["fold-constants", "simplify", "eliminate-common-subexpressions",
                                                         "fold-constants", "pack-matmuls"]], feeds, progress=False)
    record = run.records[-1]
    assert record["stats"] == {"groups": 2 * p.meta["num_layers"], "matmuls_packed": 5 * p.meta["num_layers"]}
    assert record["delta"]["max_rel"] < 1e-5


def test_invalid_group_size():
    with pytest.raises(ValueError):
        PackMatMulsPass(min_group=1)

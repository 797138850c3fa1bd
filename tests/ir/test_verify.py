import onnx_ir as ir
import pytest

from conftest import tiny_graph
from kiln.ir import VerificationError, verify


def test_valid_graph_and_real_export_verify(tiny_llama_ir):
    verify(tiny_graph())
    verify(tiny_llama_ir)


def test_out_of_order_nodes_are_reported():
    model = tiny_graph()
    nodes = list(model.graph)
    model.graph.remove(nodes[0])
    model.graph.append(nodes[0])  # MatMul now after its consumer
    with pytest.raises(VerificationError, match="topological order"):
        verify(model)


def test_dangling_value_is_reported():
    model = tiny_graph()
    relu = list(model.graph)[-1]
    stray = ir.val("stray", ir.DataType.FLOAT, ir.Shape(["N", 3]))  # defined nowhere
    relu.replace_input_with(0, stray)
    with pytest.raises(VerificationError, match="dangling value.*stray"):
        verify(model)


def test_duplicate_names_break_ssa():
    model = tiny_graph()
    mm, add, _ = list(model.graph)
    add.outputs[0].name = mm.outputs[0].name
    with pytest.raises(VerificationError, match="SSA"):
        verify(model)


def test_undefined_graph_output_is_reported():
    model = tiny_graph()
    model.graph.outputs.append(ir.val("ghost", ir.DataType.FLOAT, ir.Shape([1])))
    with pytest.raises(VerificationError, match="graph output 'ghost'"):
        verify(model)


def test_onnx_checker_runs_after_structure():
    model = tiny_graph()
    relu = list(model.graph)[-1]
    relu.attributes["bogus"] = ir.AttrFloat32("bogus", 1.0)  # Relu has no such attribute
    with pytest.raises(VerificationError, match="onnx checker"):
        verify(model)
    verify(model, checker=False)  # structurally fine


def test_all_problems_are_listed():
    model = tiny_graph()
    relu = list(model.graph)[-1]
    relu.replace_input_with(0, ir.val("a", ir.DataType.FLOAT))
    model.graph.outputs.append(ir.val("ghost", ir.DataType.FLOAT, ir.Shape([1])))
    with pytest.raises(VerificationError) as info:
        verify(model)
    assert len(info.value.problems) == 2
    assert "and 1 more" in str(info.value)


def test_subgraph_may_read_outer_values():
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2]))
    cond = ir.val("c", ir.DataType.BOOL, ir.Shape([]))
    neg = ir.node("Neg", [x], num_outputs=1)
    neg.outputs[0].dtype, neg.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([2])
    then_g = ir.Graph([], [neg.outputs[0]], nodes=[neg], name="then")
    ident = ir.node("Identity", [x], num_outputs=1)
    ident.outputs[0].dtype, ident.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([2])
    else_g = ir.Graph([], [ident.outputs[0]], nodes=[ident], name="else")
    if_node = ir.node("If", [cond], attributes={"then_branch": then_g, "else_branch": else_g}, num_outputs=1)
    if_node.outputs[0].name = "y"
    if_node.outputs[0].dtype, if_node.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([2])
    g = ir.Graph([x, cond], [if_node.outputs[0]], nodes=[if_node], opset_imports={"": 21}, name="main")
    verify(ir.Model(g, ir_version=10))

"""check-op-allowlist: ops outside the list, dynamic shapes and growing caches fail with one line."""


import onnx_ir as ir
import pytest
from conftest import tiny_graph

from kiln.ir import set_kv_layout
from kiln.manifest import KVLayout
from kiln.passes import create_pass
from kiln.passes.check_op_allowlist import ALLOWLISTS, CheckOpAllowlistPass, TargetSupportError
from kiln.passes.registry import UnknownPassError


def _static(model: ir.Model) -> ir.Model:
    for v in [*model.graph.inputs, *model.graph.outputs]:
        v.shape = ir.Shape([1 if not isinstance(d, int) else d for d in v.shape])
    return model


def test_a_static_model_of_listed_ops_passes_unchanged():
    result = CheckOpAllowlistPass()(_static(tiny_graph()))
    assert not result.modified and result.stats == {"nodes_checked": 3, "op_types": 3}


def test_an_op_outside_the_list_is_named_with_its_node_count():
    model = _static(tiny_graph())
    for node in model.graph:
        if node.op_type == "Relu":
            node.op_type, node.domain = "FastGelu", "com.microsoft"
    with pytest.raises(TargetSupportError) as info:
        CheckOpAllowlistPass()(model)
    assert str(info.value) == "op com.microsoft::FastGelu (1 nodes) is not on the qnn-htp allow-list"


def test_dynamic_shapes_fail_unless_static_is_off():
    with pytest.raises(TargetSupportError, match="static shapes: 'x' has shape"):
        CheckOpAllowlistPass()(tiny_graph())
    assert not CheckOpAllowlistPass(static=False)(tiny_graph()).modified


def test_a_growing_kv_cache_fails():
    model = _static(tiny_graph())
    set_kv_layout(model, KVLayout(num_layers=1, kv_heads=1, head_dim=4, value_head_dim=4, static=False))
    with pytest.raises(TargetSupportError, match="static KV cache"):
        CheckOpAllowlistPass()(model)


def test_the_qnn_list_holds_what_kiln_npu_graphs_use_and_not_ort_contrib_ops():
    listed = ALLOWLISTS["qnn-htp"]
    assert {("", op) for op in ("MatMul", "QuantizeLinear", "DequantizeLinear", "ScatterElements", "Softmax")} <= listed
    assert ("com.microsoft", "GroupQueryAttention") not in listed and ("", "Range") not in listed


def test_unknown_allowlist():
    with pytest.raises(UnknownPassError, match="unknown allow-list 'edgetpu'"):
        create_pass("check-op-allowlist", {"allowlist": "edgetpu"})

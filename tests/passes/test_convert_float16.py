"""convert-float16: fp16 weights, values and I/O within fp16 tolerance, sensitive ops kept in
fp32 with casts only at the region's edges, constants clipped into range."""


import numpy as np
import onnx_ir as ir
import pytest

from kiln.ir import kv_layout, verify
from kiln.passes import create_pass, run_pipeline
from kiln.passes.convert_float16 import ConvertFloat16Pass
from kiln.passes.numerics import compare, run_ort
from kiln.passes.registry import UnknownPassError

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT


def _fused_llama(cleaned):
    _, model, feeds, _ = cleaned("tiny-llama")
    passes = [create_pass(n) for n in ("insert-kv-cache", "fuse-rms-norm", "fuse-attention")]
    run = run_pipeline(model, passes, feeds, progress=False)
    return run.model, run.feeds


def test_fused_llama_in_fp16_within_tolerance(cleaned):
    model, feeds = _fused_llama(cleaned)
    before = run_ort(model, feeds)
    p = ConvertFloat16Pass()
    result = p(model)
    verify(model)
    assert result.modified and result.stats["initializers"] > 0
    assert all(v.const_value.dtype != F32 for v in model.graph.initializers.values())
    floats = [v for v in [*model.graph.inputs, *model.graph.outputs] if v.dtype in (F16, F32)]
    assert floats and all(v.dtype == F16 for v in floats)  # logits and the KV cache included
    assert kv_layout(model).dtype == "float16"
    after = run_ort(model, p.adapt_feeds(feeds, model))
    assert after["logits"].dtype == np.float16
    assert compare(before, after)["max_rel"] < 1e-2


def _rms_chain(keep_fp32):
    """y = x / sqrt(mean(x^2)): x^2 overflows fp16 (max 65504) for |x| > 256."""
    x = ir.val("x", F32, ir.Shape([2, 8]))
    two = ir.val("two", const_value=ir.tensor(np.array(2.0, np.float32)))
    axes = ir.val("axes", const_value=ir.tensor(np.array([-1], np.int64)))
    pow_ = ir.node("Pow", [x, two], num_outputs=1)
    mean = ir.node("ReduceMean", [pow_.outputs[0], axes], num_outputs=1)
    sqrt = ir.node("Sqrt", [mean.outputs[0]], num_outputs=1)
    div = ir.node("Div", [x, sqrt.outputs[0]], num_outputs=1)
    for node, shape in ((pow_, [2, 8]), (mean, [2, 1]), (sqrt, [2, 1]), (div, [2, 8])):
        node.outputs[0].dtype, node.outputs[0].shape = F32, ir.Shape(shape)
    div.outputs[0].name = "y"
    graph = ir.Graph([x], [div.outputs[0]], nodes=[pow_, mean, sqrt, div], initializers=[two, axes],
                     opset_imports={"": 21}, name="chain")
    model = ir.Model(graph, ir_version=10)
    ConvertFloat16Pass(keep_fp32=keep_fp32)(model)
    verify(model)
    return model


def test_kept_chain_stays_fp32_with_casts_only_at_its_edges():
    feeds = {"x": np.full((2, 8), 1000.0, np.float16)}
    model = _rms_chain(["Pow", "ReduceMean", "Sqrt"])
    casts = [n for n in model.graph if n.op_type == "Cast"]
    assert len(casts) == 2  # x into Pow, sqrt's result out to Div: none between Pow, ReduceMean, Sqrt
    y = run_ort(model, feeds)["y"]
    assert y.dtype == np.float16 and np.allclose(y, 1.0, atol=1e-3)
    kept = [n for n in model.graph if n.op_type in ("Pow", "ReduceMean", "Sqrt")]
    assert all(n.outputs[0].dtype == F32 for n in kept)
    # keeping nothing: the chain is fp16 (CUDA would overflow x^2; ORT's CPU EP casts up by itself)
    plain = _rms_chain([])
    assert not [n for n in plain.graph if n.op_type == "Cast"]
    assert all(n.outputs[0].dtype == F16 for n in plain.graph)


def test_large_constants_are_clipped_not_infinite():
    x = ir.val("x", F32, ir.Shape([4]))
    big = ir.val("big", const_value=ir.tensor(np.array([np.finfo(np.float32).min, 1.0, 2.0, 3.0], np.float32)))
    add = ir.node("Add", [x, big], num_outputs=1)
    add.outputs[0].name, add.outputs[0].dtype, add.outputs[0].shape = "y", F32, ir.Shape([4])
    model = ir.Model(ir.Graph([x], [add.outputs[0]], nodes=[add], initializers=[big], opset_imports={"": 21},
                              name="add"),
                     ir_version=10)
    ConvertFloat16Pass()(model)
    values = model.graph.initializers["big"].const_value.numpy()
    assert values.dtype == np.float16 and values[0] == -65504.0 and np.isfinite(values).all()


def test_second_run_changes_nothing(cleaned):
    model, _ = _fused_llama(cleaned)
    ConvertFloat16Pass()(model)
    assert not ConvertFloat16Pass()(model).modified


def test_budget_is_a_parameter():
    assert ConvertFloat16Pass(budget=0.05).budget == 0.05 and ConvertFloat16Pass.metric == "max_rel"
    with pytest.raises(UnknownPassError, match="no parameter 'precision'"):
        create_pass("convert-float16", {"precision": "bf16"})

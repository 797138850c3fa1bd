"""kiln.ir.torch_graph: the torch evaluation of a graph agrees with ONNX Runtime, before and
after the ORT fusions, and refuses what it does not implement by name."""

import numpy as np
import pytest
import torch

from conftest import tiny_graph
from kiln.ir import load_model, summary
from kiln.ir.torch_graph import TorchGraph, UnsupportedOp
from kiln.models import sample_inputs
from kiln.passes import create_pass, run_pipeline
from kiln.passes.numerics import compare, run_ort
from kiln.recipes import load_recipe


def _fp32(prepared, name, extra=()):
    p = prepared(name)
    model = load_model(p.path)
    feeds = sample_inputs(p.meta, summary(model).inputs)
    passes = load_recipe("fp32").build() + [create_pass(n) for n in extra]
    run = run_pipeline(model, passes, feeds, progress=False)
    return run.model, run.feeds


def _agree(model, feeds):
    expected = run_ort(model, feeds)
    got = TorchGraph(model)(feeds)
    names = [v.name for v in model.graph.outputs]
    return compare(expected, {n: t.detach().numpy() for n, t in zip(names, got)})


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert", *[pytest.param(n, marks=pytest.mark.slow) for n in
                                                                ["tiny-qwen2", "tiny-gemma", "tiny-phi3", "tiny-gpt2",
                                                                 "tiny-neox", "tiny-opt"]]])
def test_matches_ort_on_exported_models(prepared, name):
    model, feeds = _fp32(prepared, name)
    assert _agree(model, feeds)["max_rel"] < 1e-4


@pytest.mark.parametrize("name, fused", [("tiny-llama", "com.microsoft::GroupQueryAttention"),
                                         ("tiny-bert", "com.microsoft::MultiHeadAttention")])
def test_matches_ort_on_fused_contrib_ops(prepared, name, fused):
    model, feeds = _fp32(prepared, name, ["fuse-rms-norm", "fuse-layer-norm", "fuse-gelu", "fuse-attention"])
    assert fused in summary(model).ops
    assert _agree(model, feeds)["max_rel"] < 1e-4


def test_matches_ort_on_a_static_cache(prepared):
    """The TVM backend's static cache writes the new keys with ScatterElements."""
    p = prepared("tiny-llama")
    model = load_model(p.path)
    feeds = sample_inputs(p.meta, summary(model).inputs)
    passes = [create_pass(n) for n in ["fold-constants", "simplify", "eliminate-common-subexpressions", "fold-constants"]]
    run = run_pipeline(model, passes + [create_pass("insert-kv-cache", {"static_length": 32})], feeds, progress=False)
    assert "ScatterElements" in summary(run.model).ops
    assert _agree(run.model, run.feeds)["max_rel"] < 1e-4


def test_gradients_reach_a_swapped_initializer():
    model = tiny_graph()
    w = torch.tensor(model.graph.initializers["W"].const_value.numpy(), requires_grad=True)
    (y,) = TorchGraph(model)({"x": np.ones((2, 4), np.float32)}, {"W": w})
    y.sum().backward()
    # y = relu(x W + b) with every pre-activation positive: dy/dW[k, n] = Σ_rows x[row, k] = 2
    assert torch.allclose(w.grad, torch.full_like(w, 2.0))


def test_an_op_without_torch_evaluation_is_named():
    model = tiny_graph()
    relu = list(model.graph)[-1]
    relu.op_type = "Hardmax"
    with pytest.raises(UnsupportedOp, match="ai.onnx::Hardmax"):
        TorchGraph(model)


@pytest.mark.parametrize("compact", [False, True])
def test_recomputing_weights_in_the_backward_gives_the_same_gradients(prepared, monkeypatch, compact):
    """Dequantized weights (and their transposes) are recomputed for the backward pass instead
    of kept: the loss and every scale's gradient are the same bits."""
    import kiln.ir.torch_graph as tg
    from kiln.passes.quantize_weights import QuantizeWeightsPass

    monkeypatch.setattr(tg, "RECOMPUTE_ELEMENTS", 1)  # the tiny model's weights count as large
    model, feeds = _fp32(prepared, "tiny-llama")
    QuantizeWeightsPass(bits=4, block_size=16, min_elements=0, symmetric=not compact, compact_scales=compact)(model)
    names = [v.name for v in model.graph.initializers.values() if v.name.endswith(".scale_step" if compact else ".scale")]
    assert names
    graph = TorchGraph(model)
    results = []
    for recompute in (False, True):
        graph.recompute = recompute
        params = {n: torch.from_numpy(model.graph.initializers[n].const_value.numpy().copy()).requires_grad_()
                  for n in names}
        (logits,) = graph(feeds, params, ["logits"])
        loss = torch.log_softmax(logits, -1).exp().square().sum()
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in params.items()}))
    (loss0, grads0), (loss1, grads1) = results
    assert loss0 == loss1
    assert all(torch.equal(grads0[n], grads1[n]) for n in names)


@pytest.mark.parametrize("as_constant_node", [True, False])
def test_a_scalar_index_keeps_its_rank(as_constant_node):
    """Gather by a 0-d index drops the axis (Bloom's fused QKV select): a scalar constant stays 0-d."""
    import onnx_ir as ir

    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2, 3, 4]))
    index = ir.tensor(np.array(1, dtype=np.int64))
    nodes, initializers = [], []
    if as_constant_node:
        const = ir.node("Constant", [], attributes={"value": index}, num_outputs=1)
        idx, nodes = const.outputs[0], [const]
    else:
        idx = ir.val("idx", const_value=index)
        initializers = [idx]
    gather = ir.node("Gather", [x, idx], attributes={"axis": 1}, num_outputs=1)
    gather.outputs[0].name = "y"
    gather.outputs[0].dtype, gather.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([2, 4])
    graph = ir.Graph([x], [gather.outputs[0]], nodes=[*nodes, gather], initializers=initializers,
                     opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    feeds = {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4)}
    (got,) = TorchGraph(model)(feeds)
    assert tuple(got.shape) == (2, 4)
    assert np.array_equal(got.numpy(), run_ort(model, feeds)["y"])

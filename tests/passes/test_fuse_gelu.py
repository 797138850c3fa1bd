"""fuse-gelu: GELU subgraphs -> ORT's Gelu / FastGelu, and Gelu(x + bias) -> BiasGelu."""

import math

import numpy as np
import onnx_ir as ir
from conftest import assert_same_outputs

from kiln.ir import summary
from kiln.passes import create_pass


def test_bias_gelu_fuses_on_every_layer_and_outputs_stay(cleaned):
    meta, model, feeds, _ = cleaned("tiny-bert")
    layers = meta["num_layers"]
    before = ir.from_proto(ir.to_proto(model))
    assert summary(model).ops["Gelu"] == layers  # exported as ONNX Gelu: no Erf form left to fuse
    result = create_pass("fuse-gelu")(model)
    assert result.modified and not result.warnings
    assert result.stats == {"gelu_sites": 0, "gelu_fused": 0, "bias_gelu_fused": layers}
    ops = summary(model).ops
    assert ops["com.microsoft::BiasGelu"] == layers and "Gelu" not in ops
    assert_same_outputs(before, model, feeds, rtol=1e-5)
    assert not create_pass("fuse-gelu")(model).modified


def _erf_gelu() -> ir.Model:
    """y = 0.5 * (x * (Erf(x / sqrt(2)) + 1)); x: float[N, 8]."""
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["N", 8]))
    consts = {name: ir.val(name, const_value=ir.tensor(np.array(v, dtype=np.float32)))
              for name, v in [("sqrt2", math.sqrt(2)), ("one", 1.0), ("half", 0.5)]}
    div = ir.node("Div", [x, consts["sqrt2"]], num_outputs=1)
    erf = ir.node("Erf", [div.outputs[0]], num_outputs=1)
    add = ir.node("Add", [erf.outputs[0], consts["one"]], num_outputs=1)
    mul = ir.node("Mul", [x, add.outputs[0]], num_outputs=1)
    out = ir.node("Mul", [consts["half"], mul.outputs[0]], num_outputs=1)
    nodes = [div, erf, add, mul, out]
    for n in nodes:
        n.outputs[0].dtype, n.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(["N", 8])
    out.outputs[0].name = "y"
    graph = ir.Graph([x], [out.outputs[0]], nodes=nodes, initializers=list(consts.values()),
                     opset_imports={"": 21}, name="erf_gelu")
    return ir.Model(graph, ir_version=10)


def test_erf_form_becomes_one_gelu_exactly():
    model, before = _erf_gelu(), _erf_gelu()
    result = create_pass("fuse-gelu")(model)
    assert result.stats == {"gelu_sites": 1, "gelu_fused": 1, "bias_gelu_fused": 0} and not result.warnings
    assert summary(model).ops == {"com.microsoft::Gelu": 1}
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32) * 3}
    assert_same_outputs(before, model, feeds, rtol=1e-5)

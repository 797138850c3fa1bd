"""fuse-rms-norm: RMSNorm -> SimplifiedLayerNormalization, and after a residual add ->
SkipSimplifiedLayerNormalization; the reason when a site does not fuse."""

import numpy as np
import onnx_ir as ir
from conftest import assert_same_outputs

from kiln.ir import summary
from kiln.passes import create_pass


def test_every_rms_norm_fuses_and_outputs_stay(cleaned):
    meta, model, feeds, _ = cleaned("tiny-llama")
    layers = meta["num_layers"]
    before = ir.from_proto(ir.to_proto(model))
    result = create_pass("fuse-rms-norm")(model)
    # two norms per layer and the final one; every norm but the first follows a residual add
    assert result.modified and not result.warnings
    assert result.stats == {"norms_seen": 2 * layers + 1, "rms_fused": 2 * layers + 1, "skip_fused": 2 * layers}
    ops = summary(model).ops
    assert ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 2 * layers
    assert ops["SimplifiedLayerNormalization"] == 1
    assert "ReduceMean" not in ops and "Sqrt" not in ops
    assert_same_outputs(before, model, feeds, rtol=1e-5)
    assert not create_pass("fuse-rms-norm")(model).modified


def test_unfusable_norm_is_a_warning_with_the_reason():
    # RMSNorm with a non-constant epsilon: g * (x * 1/sqrt(mean(x^2) + eps_input))
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["B", 4]))
    eps = ir.val("eps", ir.DataType.FLOAT, ir.Shape([]))
    two = ir.val("two", const_value=ir.tensor(np.array(2.0, dtype=np.float32)))
    axes = ir.val("axes", const_value=ir.tensor(np.array([-1], dtype=np.int64)))
    pow_ = ir.node("Pow", [x, two], num_outputs=1)
    mean = ir.node("ReduceMean", [pow_.outputs[0], axes], attributes={"keepdims": 1, "noop_with_empty_axes": 0}, num_outputs=1)
    add = ir.node("Add", [mean.outputs[0], eps], num_outputs=1)
    sqrt = ir.node("Sqrt", [add.outputs[0]], num_outputs=1)
    rec = ir.node("Reciprocal", [sqrt.outputs[0]], num_outputs=1)
    norm = ir.node("Mul", [x, rec.outputs[0]], num_outputs=1)
    gamma = ir.val("gamma", const_value=ir.tensor(np.ones(4, dtype=np.float32)))
    mul = ir.node("Mul", [norm.outputs[0], gamma], num_outputs=1)
    mul.outputs[0].name = "y"
    for n in (pow_, norm, mul):
        n.outputs[0].dtype, n.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(["B", 4])
    for n in (mean, add, sqrt, rec):
        n.outputs[0].dtype, n.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(["B", 1])
    g = ir.Graph([x, eps], [mul.outputs[0]], nodes=[pow_, mean, add, sqrt, rec, norm, mul], initializers=[two, axes, gamma],
                 opset_imports={"": 20}, name="g")
    result = create_pass("fuse-rms-norm")(ir.Model(g, ir_version=10))
    assert not result.modified
    assert result.stats["norms_seen"] == 1 and result.stats["rms_fused"] == 0
    assert result.warnings and result.warnings[0].startswith("RMSNorm fused on 0/1: ")
    assert "epsilon" in result.warnings[0].lower() or "constant" in result.warnings[0].lower(), result.warnings


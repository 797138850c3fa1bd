"""fuse-layer-norm: LayerNormalization after a residual add -> SkipLayerNormalization."""

import onnx_ir as ir
from conftest import assert_same_outputs

from kiln.ir import summary
from kiln.passes import create_pass


def test_every_residual_layer_norm_fuses_and_outputs_stay(cleaned):
    meta, model, feeds, _ = cleaned("tiny-bert")
    layers = meta["num_layers"]
    before = ir.from_proto(ir.to_proto(model))
    norms = summary(model).ops["LayerNormalization"]
    result = create_pass("fuse-layer-norm")(model)
    # two residual norms per layer; the embeddings norm (a broadcast add of positions) is not one
    assert result.modified and not result.warnings
    assert result.stats == {"residual_norms_seen": 2 * layers, "skip_layer_norm_fused": 2 * layers}
    ops = summary(model).ops
    assert ops["com.microsoft::SkipLayerNormalization"] == 2 * layers
    assert ops["LayerNormalization"] == norms - 2 * layers
    assert_same_outputs(before, model, feeds, rtol=1e-5)
    assert not create_pass("fuse-layer-norm")(model).modified

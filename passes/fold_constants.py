"""Fold constant subgraphs into initializers.

    op(const_a, const_b, ...)                    ->  initializer
    Shape(x) where x's dims are static           ->  initializer   (and all its consumers)
    Gather(Shape(x), i) where dim i is static    ->  initializer

Wraps onnxscript's constant folder, which evaluates ops whose inputs are all constant
(with the ONNX reference evaluator) and partially evaluates shape arithmetic using the
known dims of each value (`shape_inference=True` runs ONNX node-level shape inference
to learn them). Shape subgraphs therefore fold only as far as dims are static: with
symbolic batch/sequence axes, the `Shape -> Gather -> Concat -> Reshape` chains that
depend on them stay; once a target specialises the input shapes they fold away.

Preconditions: none. Exact: outputs are unchanged up to float rounding.
Nodes the folder bypasses are removed. Not handled: tensors larger than `size_limit` elements (kept as computations, to avoid
bloating the artifact, e.g. an expanded causal mask); control-flow ops; random ops.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.optimizer import _constant_folding

from kiln.passes.base import KilnPass, count_nodes, fingerprint
from kiln.passes.registry import register_pass


@register_pass("fold-constants")
class FoldConstantsPass(KilnPass):
    def __init__(self, shape_inference: bool = True, size_limit: int = 1 << 20):
        super().__init__()
        self.shape_inference = shape_inference
        self.size_limit = size_limit

    def call(self, model: ir.Model):
        before, nodes, inits = fingerprint(model), count_nodes(model), len(model.graph.initializers)
        _constant_folding.FoldConstantsPass(
            shape_inference=self.shape_inference,
            input_size_limit=self.size_limit,
            output_size_limit=self.size_limit,
        )(model)
        # Folding rewires consumers to constants; the producers it bypassed are removed
        # here so that `nodes_folded` is the real reduction.
        RemoveUnusedNodesPass()(model)
        stats = {
            "nodes_before": nodes,
            "nodes_folded": nodes - count_nodes(model),
            "constants_created": len(model.graph.initializers) - inits,
        }
        return self.result(model, modified=fingerprint(model) != before, stats=stats)

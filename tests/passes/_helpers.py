"""Small hand-built graphs shared by several pass test files (tests/passes is on sys.path)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

GATHER_FEEDS = {"ids": np.array([[1, 2, 3, 49], [0, 7, 7, 8]], dtype=np.int64)}


def gather_matmul_model(k=40, n=24, vocab=50, tied=False) -> ir.Model:
    """y = Gather(E, ids) @ W (or @ Transpose(E) when tied); K = 40 is not a power of two."""
    rng = np.random.default_rng(0)
    ids = ir.val("ids", ir.DataType.INT64, ir.Shape(["B", "S"]))
    table = ir.val("E", const_value=ir.tensor(rng.standard_normal((vocab, k)).astype(np.float32)))
    gather = ir.node("Gather", [table, ids], num_outputs=1)
    nodes, inits = [gather], [table]
    if tied:
        t = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, num_outputs=1)
        nodes.append(t)
        weight, n = t.outputs[0], vocab
    else:
        weight = ir.val("W", const_value=ir.tensor(rng.standard_normal((k, n)).astype(np.float32)))
        inits.append(weight)
    mm = ir.node("MatMul", [gather.outputs[0], weight], num_outputs=1)
    mm.outputs[0].name, mm.outputs[0].dtype, mm.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape(["B", "S", n])
    nodes.append(mm)
    return ir.Model(ir.Graph([ids], [mm.outputs[0]], nodes=nodes, initializers=inits, opset_imports={"": 21}, name="g"),
                    ir_version=10)

"""kiln.ir: the thin layer kiln adds over `onnx_ir`.

onnx_ir is the IR. This package only adds what passes need and onnx_ir lacks:
`verify` (structural checks after every pass), `summary` (ops, parameters, bytes),
shape helpers, `values` (constants, new initializers, reachability), a networkx view for
graph algorithms, and `torch_graph` (the graph run in torch for passes that train by
gradient; imported on use, since it loads torch).
"""

from kiln.ir.graph import as_networkx
from kiln.ir.io import load_model, save_model, without_weights
from kiln.ir.kv import KV_CACHE_METADATA, kv_layout, set_kv_layout
from kiln.ir.shapes import dims, infer_shapes, is_static
from kiln.ir.summary import Summary, summary
from kiln.ir.verify import VerificationError, verify

__all__ = [
    "KV_CACHE_METADATA",
    "Summary",
    "VerificationError",
    "as_networkx",
    "dims",
    "infer_shapes",
    "is_static",
    "kv_layout",
    "load_model",
    "save_model",
    "set_kv_layout",
    "summary",
    "without_weights",
    "verify",
]

"""The KV-cache layout a graph carries in its metadata.

`insert-kv-cache` records how the graph takes and returns its cache under the model metadata
key `kiln.kv_cache`, as the JSON of the manifest's `kv_cache` section; later passes update it
(fp16 caches, fused rotary, the shared buffer), the backends and the compiler read it, and the
compiler copies it into the manifest. Everyone reads and writes it as the one typed
`kiln.manifest.KVLayout` (docs/manifest.md), never as a dict.
"""

from __future__ import annotations

import json

import onnx_ir as ir

from kiln.manifest import KVLayout

KV_CACHE_METADATA = "kiln.kv_cache"


def kv_layout(model: ir.Model) -> KVLayout | None:
    """The graph's cache layout, or None for a graph without a KV cache."""
    text = model.metadata_props.get(KV_CACHE_METADATA)
    return KVLayout.from_manifest(json.loads(text)) if text else None


def set_kv_layout(model: ir.Model, layout: KVLayout) -> None:
    model.metadata_props[KV_CACHE_METADATA] = json.dumps(layout.as_dict())

"""Hand edits of a compiled artifact, for testing what a runtime reads from the contract alone
(the graph's value names and kiln.json), independently of how the compiler writes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx

from kiln.manifest import cache_names, describe_files


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rename_values(artifact: Path, renames: dict[str, str]) -> None:
    """Rename graph inputs/outputs (and every node use) in model.onnx, and in the manifest's io.
    The weights stay in their external-data file, which the graph still names."""
    manifest = json.loads((artifact / "kiln.json").read_text())
    path = artifact / manifest["backend"]["model"]
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    onnx.save(model, str(path))
    for side in ("inputs", "outputs"):
        for tensor in manifest["io"][side]:
            tensor["name"] = renames.get(tensor["name"], tensor["name"])
    (artifact / "kiln.json").write_text(json.dumps(manifest, indent=2))
    refresh_files(artifact)


def refresh_files(artifact: Path) -> dict:
    """The manifest's `files` record (sizes and sha256) rewritten for the files as they are now,
    as if the edited artifact had been compiled so. Returns the new manifest."""
    manifest = json.loads((artifact / "kiln.json").read_text())
    if "files" in manifest:
        manifest["files"] = describe_files(artifact)
        (artifact / "kiln.json").write_text(json.dumps(manifest, indent=2))
    return manifest


PAST = "layer{layer}/cache_in_{key|value}: renamed by the test"
PRESENT = "layer{layer}/cache_out_{key|value}"


def rename_cache(artifact: Path, past: str = PAST, present: str = PRESENT) -> dict:
    """The artifact's cache inputs and outputs renamed to the templates `past` / `present`, and
    the manifest's kv_cache templates changed to match. Returns the new manifest."""
    manifest = json.loads((artifact / "kiln.json").read_text())
    kv = manifest["kv_cache"]
    renames = {}
    for old, new in ((kv["past"], past), (kv["present"], present)):
        for a, b in zip(cache_names(old, kv["num_layers"]), cache_names(new, kv["num_layers"])):
            renames.update(zip(a, b))
    rename_values(artifact, renames)
    manifest = json.loads((artifact / "kiln.json").read_text())
    manifest["kv_cache"].update(past=past, present=present)
    (artifact / "kiln.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def edit_manifest(artifact: Path, **changes) -> dict:
    """Top-level manifest fields replaced (a dict value for a section replaces the section)."""
    manifest = json.loads((artifact / "kiln.json").read_text())
    manifest.update(changes)
    (artifact / "kiln.json").write_text(json.dumps(manifest, indent=2))
    return manifest

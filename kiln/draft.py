"""A draft for speculative decoding, derived from the target by kiln's own passes and bundled in
its artifact (`kiln compile MODEL --draft`, `kiln.compile(..., draft=True)`).

    DIR/  kiln.json          the target's manifest, with `draft`: {"path": "draft", "recipe", "parameters", "bytes",
                             "layers", "agreement"}
          model.onnx ...     the target
          draft/             the draft: a whole artifact (its own kiln.json, graph, tokenizer)

The draft is compiled first, from the same model, with the `draft` recipe (drop-layers to 45%
of the parameters, then int4 by round to nearest and ORT's CPU lowering, all with loose budgets:
kiln/recipes/draft.toml; so target cpu and backend ort only) or `draft_recipe`, into a scratch
directory; then the target, as `compile` makes it; then the draft moves into the target's
directory and the target's manifest gains `draft` and the draft's files in `files`. A failure
before that last step leaves nothing (the compiles are atomic); the runtime reads the draft
through `Artifact.speculation("draft")` (docs/speculative.md).

`agreement` is the draft's top-1 agreement with the target on held-out text (the first
`AGREEMENT_TOKENS` tokens of the Lee corpus, teacher-forced): the share of positions where both
predict the same next token, the acceptance rate of greedy drafting. `kiln run` drafts with the
bundled draft by default only from `kiln.runtime.speculative.MIN_AGREEMENT` on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from kiln.compiler import CompileError, CompileResult, compile
from kiln.corpus import default_corpus, read_text
from kiln.manifest import MANIFEST, check_manifest, describe_files, write_manifest
from kiln.runtime import load

DRAFT_DIR = "draft"
AGREEMENT_TOKENS = 512


def compile_with_draft(model, output: str | Path, *, draft_recipe: str | Path = "draft", **options) -> CompileResult:
    """`compile(model, output, **options)`, with a draft compiled from the same model bundled in it."""
    where = (options.get("target", "cpu"), options.get("backend", "ort"))
    if draft_recipe == "draft" and where != ("cpu", "ort"):
        raise CompileError(f"--draft derives an ORT CPU draft (recipe draft: ORT's CPU lowering); this compile is for "
                           f"target {where[0]}, backend {where[1]}")
    shared = {k: options[k] for k in ("task", "tokenizer", "allow_pickle", "example_inputs", "dynamic_shapes",
                                      "calibration", "progress", "console", "target", "backend", "lora") if k in options}
    with tempfile.TemporaryDirectory(prefix="kiln-draft-") as scratch:
        draft = compile(model, Path(scratch) / DRAFT_DIR, recipe=draft_recipe, **shared)
        if draft.manifest["task"] != "causal-lm":
            raise CompileError(f"--draft is for a causal LM; this model is {draft.manifest['task']}")
        result = compile(model, output, **options)
        return CompileResult(result.path, bundle(result.path, result.manifest, draft))


def bundle(directory: Path, manifest: dict, draft: CompileResult) -> dict:
    """Move the compiled draft into the artifact at `directory` and record it in its manifest."""
    shutil.move(str(draft.path), str(directory / DRAFT_DIR))
    files = describe_files(directory)
    manifest = {**manifest, "files": files,
                "draft": {"path": DRAFT_DIR, "recipe": draft.manifest["recipe"]["name"],
                          "parameters": draft.manifest["summary"]["artifact"]["parameters"],
                          "bytes": sum(r["bytes"] for rel, r in files.items() if rel.startswith(f"{DRAFT_DIR}/")),
                          "layers": draft.manifest["kv_cache"]["num_layers"],
                          "agreement": round(agreement(directory, directory / DRAFT_DIR), 4)}}
    check_manifest(manifest, "the manifest")
    with tempfile.TemporaryDirectory(dir=directory, prefix=".kiln-manifest-") as staging:
        write_manifest(Path(staging), manifest)  # then replaced in one step: a reader sees one manifest or the other
        os.replace(Path(staging) / MANIFEST, directory / MANIFEST)
    return manifest


def agreement(target_dir: Path, draft_dir: Path) -> float:
    """Top-1 agreement of the draft with the target on held-out text, teacher-forced."""
    target, draft = load(target_dir), load(draft_dir)
    ids = np.array([target.encode(read_text(default_corpus()))[:AGREEMENT_TOKENS]])
    return float((target._lm().all_logits(ids).argmax(-1) == draft._lm().all_logits(ids).argmax(-1)).mean())

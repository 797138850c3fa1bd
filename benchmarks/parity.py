"""Greedy parity of causal-LM artifacts with transformers, on the source model they came from.

    python -m benchmarks.parity [ARTIFACT ...] [--source PATH] [--tokens 48]

Without an artifact it compiles smollm2-135m (fp32) once into the cache. For each prompt, transformers' `generate(do_sample=False)` on the source model (loaded from
the path or name in the first artifact's manifest, or `--source`) against the artifact's
greedy tokens through kiln's runtime (KV cache, as deployed). Prints a Markdown table: per
artifact, the prompts whose tokens are identical and the first position that differs.
Exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import kiln
from kiln.models.cache import cache_dir
from kiln.reference import _source, reference_generate
from kiln.runtime import load

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
           "The three primary colors are", "Water boils at"]


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="*", type=Path)
    parser.add_argument("--source", help="the source model's path or kiln name (default: from the manifest)")
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args(argv)
    if not args.artifacts:
        args.artifacts = [cache_dir("bench") / "kiln-smollm2-fp32"]
        if not (args.artifacts[0] / "kiln.json").exists():
            kiln.compile("smollm2-135m", args.artifacts[0], recipe="fp32", force=True)
    manifest = json.loads((args.artifacts[0] / "kiln.json").read_text())
    source = Path(args.source) if args.source and Path(args.source).exists() else None
    if args.source and source is None:  # a kiln model name
        manifest = {**manifest, "source": {"source": args.source}}
    loaded = _source(manifest, source)
    arts = [load(a) for a in args.artifacts]
    failures = 0
    print("| artifact | recipe | identical | first difference per prompt |")
    print("|---|---|---|---|")
    for path, art in zip(args.artifacts, arts):
        diffs = []
        for prompt in PROMPTS:
            ids = art.encode(prompt)
            want = reference_generate(art.manifest, ids, args.tokens, loaded=loaded)
            got = art.generate(ids, max_new_tokens=args.tokens).token_ids
            diffs.append(first_difference(want, got))
        same = sum(d is None for d in diffs)
        failures += len(PROMPTS) - same
        shown = ", ".join("-" if d is None else str(d) for d in diffs)
        print(f"| {path} | {art.manifest['recipe']['name']} | {same}/{len(PROMPTS)} × {args.tokens} tokens | {shown} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

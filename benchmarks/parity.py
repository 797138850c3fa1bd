"""Greedy parity of a compiled SmolLM2 artifact with transformers generate(do_sample=False).

    python -m benchmarks.parity [ARTIFACT] [--new-tokens 64]

Compiles smollm2-135m with the default recipe if ARTIFACT is not given. Exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import kiln
from kiln.models import get_source
from kiln.models.cache import cache_dir
from kiln.reference import reference_generate

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
           "The three primary colors are", "Water boils at"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", nargs="?", type=Path)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    path = args.artifact or cache_dir("bench") / "kiln-smollm2-fp32"
    if not (path / "kiln.json").exists():
        kiln.compile("smollm2-135m", path, force=True)
    art = kiln.load(path)
    loaded = get_source(art.manifest["source"]["source"]).load()
    failures = 0
    for prompt in PROMPTS:
        t0 = time.perf_counter()
        gen = art.generate(prompt, args.new_tokens)
        seconds = time.perf_counter() - t0
        ref = reference_generate(art.manifest, gen.prompt_ids, args.new_tokens, loaded=loaded)
        same = gen.token_ids == ref
        failures += not same
        print(f"{'same' if same else 'DIFFERENT'}  {len(gen.token_ids):3d} tokens  "
              f"{len(gen.token_ids) / seconds:5.1f} tok/s  {prompt!r} -> {gen.text[:60]!r}", flush=True)
    print(f"{len(PROMPTS) - failures}/{len(PROMPTS)} prompts token-identical to transformers generate(do_sample=False)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: fetch SmolLM2-135M, compile it, continue a prompt, check it, summarise.

Run as `python -m kiln.demo [PROMPT]`. The compiled artifact is left in
artifacts/smollm2-135m-fp32 for `kiln run` and `kiln inspect`.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.table import Table

import kiln
from kiln.cli import artifact_bytes, coverage, passes_table
from kiln.reference import reference_generate

PROMPT = "The capital of France is"
NEW_TOKENS = 32
OUTPUT = "artifacts/smollm2-135m-fp32"


def main() -> int:
    console = Console()
    prompt = sys.argv[1] if len(sys.argv) > 1 else PROMPT
    console.rule("kiln demo: SmolLM2-135M-Instruct")
    start = time.perf_counter()
    result = kiln.compile("smollm2-135m", OUTPUT, recipe="fp32", force=True, console=console)
    compile_seconds = time.perf_counter() - start

    art = kiln.load(result.path)
    console.print(f"\n[bold]prompt:[/] {prompt!r}")
    t0 = time.perf_counter()
    gen = art.generate(prompt, NEW_TOKENS)
    gen_seconds = time.perf_counter() - t0
    console.print(f"[bold]kiln:[/]   {gen.text!r}")

    console.print("checking against transformers generate(do_sample=False) ...")
    ref = reference_generate(art.manifest, gen.prompt_ids, NEW_TOKENS)
    same = ref == gen.token_ids
    console.print(f"[bold]torch:[/]  {art.tokenizer.decode(ref, skip_special_tokens=True)!r}")

    console.print()
    console.print(passes_table(result.manifest["passes"], verbose=False))
    s = result.manifest["summary"]
    table = Table("summary", "value")
    table.add_row("artifact", f"{result.path} ({artifact_bytes(result.path) / 1e6:.1f} MB)")
    table.add_row("graph nodes", f"{s['source']['nodes']} → {s['artifact']['nodes']}")
    table.add_row("fusion coverage", "\n".join(coverage(result.manifest["passes"])))
    table.add_row("parameters", f"{s['artifact']['parameters']:,}")
    table.add_row("compile time", f"{compile_seconds:.1f} s (export {result.manifest['compile'].get('export_seconds') or 0:.0f} s when not cached)")
    table.add_row("artifact vs last pass", f"max_rel {result.manifest['compile']['artifact_check']['max_rel']:.1e}")
    table.add_row("generation", f"{len(gen.token_ids)} tokens in {gen_seconds:.2f} s (KV cache, batch 1, includes prefill)")
    table.add_row("greedy tokens = transformers", f"{'yes' if same else 'NO'} ({sum(a == b for a, b in zip(gen.token_ids, ref))}/{len(ref)})")
    console.print(table)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

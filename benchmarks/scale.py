"""Scale: a checkpoint with Qwen2.5-0.5B's shapes (about 494M parameters, random init, saved with
`save_pretrained` as a user's folder is) compiled by path, one recipe per child process: wall time,
peak RSS (the child's VmHWM) and the seconds of every pass, from the manifest.

    python -m benchmarks.scale [--recipe int4 ...] [--workdir DIR]

The checkpoint is built once under $KILN_CACHE/scale/ (2 GB of float32 safetensors) and reused; its
tokenizer is kiln's byte-level one, so calibration reads real text as bytes. Writes the "scale"
section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Qwen/Qwen2.5-0.5B's config.json (shapes only; the weights are random)
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.02)

CHILD = """
import json, sys, time
import kiln
from kiln.bench import peak_rss_mb
from benchmarks.compression import size_mb
folder, out, recipe = sys.argv[1:4]
start = time.perf_counter()
result = kiln.compile(folder, out, recipe=recipe, force=True, progress=False)
seconds = time.perf_counter() - start
passes = [{"name": r["name"], "seconds": r.get("seconds")} for r in result.manifest.get("passes", [])]
print(json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": round(peak_rss_mb(), 1), "passes": passes,
                  "size_mb": size_mb(result.path)}))
"""


def checkpoint() -> Path:
    """The 0.5B folder, built once (atomically) in kiln's cache."""
    import torch
    import transformers

    from kiln.models import tiny
    from kiln.models.cache import atomic_dir, cache_dir

    final = cache_dir("scale") / "qwen2.5-0.5b-shapes"
    if (final / "config.json").is_file():
        return final
    with atomic_dir(final) as tmp:
        torch.manual_seed(0)
        config = transformers.Qwen2Config(**QWEN25_05B, bos_token_id=tiny.EOS, eos_token_id=tiny.EOS)
        model = transformers.Qwen2ForCausalLM(config).eval()
        model.save_pretrained(tmp)
        (tmp / "tokenizer.json").write_text(tiny.byte_tokenizer(bert_style=False).to_str())
        del model
    return final


def compile_in_child(folder: Path, out: Path, recipe: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out), recipe], capture_output=True,
                          text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(rows: dict[str, dict], parameters: int) -> str:
    from benchmarks.report import machine_line

    lines = [f"## Scale: a {parameters / 1e6:.0f}M-parameter checkpoint (Qwen2.5-0.5B's shapes) compiled by path",
             "", f"- {machine_line()}",
             f"- Command: `python -m benchmarks.scale --recipe {' '.join(rows)}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); one child process per recipe.", "",
             "| Recipe | Wall (s) | Peak RSS (GB) | Bytes of RSS per parameter | Artifact (MB) | Slowest passes (s) |",
             "|---|---:|---:|---:|---:|---|"]
    for recipe, r in rows.items():
        if "error" in r:
            lines.append(f"| {recipe} | failed: {r['error']} | | | | |")
            continue
        slow = sorted((p for p in r["passes"] if p["seconds"]), key=lambda p: -p["seconds"])[:4]
        lines.append(f"| {recipe} | {r['seconds']:.0f} | {r['peak_rss_mb'] / 1024:.1f} | "
                     f"{r['peak_rss_mb'] * 2**20 / parameters:.1f} | {r['size_mb']:.0f} | "
                     + ", ".join(f"{p['name']} {p['seconds']:.0f}" for p in slow) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", nargs="+", default=["fp32", "int4"], help="recipes to compile, in order")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-scale"), help="where the artifacts go")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = parser.parse_args(argv)

    from safetensors import safe_open

    from benchmarks.report import write_section

    folder = checkpoint()
    parameters = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            parameters += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    rows = {}
    for recipe in args.recipe:
        print(f"{recipe}: compiling {folder} ...", flush=True)
        rows[recipe] = compile_in_child(folder, args.workdir / recipe, recipe)
        print(f"  {json.dumps(rows[recipe])}", flush=True)
    text = render(rows, parameters)
    print(text)
    if not args.no_write:
        write_section("scale", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

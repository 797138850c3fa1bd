"""Run a gpu-target artifact on a CUDA machine and compare it with the cpu artifact.

    python scripts/gpu_check.py GPU_DIR CPU_DIR [--tolerance 0.02] [--require-cuda]

Needs onnxruntime-gpu (CUDAExecutionProvider). The gpu artifact (`kiln compile M -o GPU_DIR
-t gpu`) runs with the providers its manifest names; the cpu artifact (`-t cpu -r fp32`) is
the reference. Causal LMs: logits on the same text, scale-relative max |Δ|, KL and top-1
agreement; encoders: cosine of the embeddings. Prints one JSON line and exits 1 when the
difference exceeds the tolerance, or, with --require-cuda, when CUDA did not run it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import kiln
from kiln.evaluate import sentences
from kiln.corpus import default_corpus, read_text
from kiln.passes.numerics import compare
from kiln.runtime.generate import Model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gpu_dir")
    parser.add_argument("cpu_dir")
    parser.add_argument("--tolerance", type=float, default=2e-2, help="max scale-relative |Δ| (LLM) or 1 - min cosine")
    parser.add_argument("--require-cuda", action="store_true")
    args = parser.parse_args(argv)

    gpu, cpu = kiln.load(args.gpu_dir), kiln.load(args.cpu_dir)
    providers = gpu.session.get_providers()
    text = read_text(default_corpus())
    start = time.perf_counter()
    if gpu.task == "causal-lm":
        ids = np.array(gpu.encode(text)[:256], dtype=np.int64)[None]
        got = Model(gpu.session, gpu.manifest).all_logits(ids).astype(np.float32)
        seconds = time.perf_counter() - start
        ref = Model(cpu.session, cpu.manifest).all_logits(ids)
        delta = compare({"logits": ref}, {"logits": got})
        result = {"max_rel": delta["max_rel"], "kl": delta["kl"], "top1": delta["top1"]}
        ok = delta["max_rel"] <= args.tolerance
    else:
        sents = sentences(text, 64)
        got = gpu.embed(sents).astype(np.float32)
        seconds = time.perf_counter() - start
        ref = cpu.embed(sents)
        cos = np.sum(got * ref, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        result = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
        ok = 1 - float(cos.min()) <= args.tolerance
    cuda = "CUDAExecutionProvider" in providers
    print(json.dumps({"task": gpu.task, "providers": providers, "ran_on_cuda": cuda, "seconds": round(seconds, 3),
                      **result, "tolerance": args.tolerance, "ok": ok}))
    return 0 if ok and (cuda or not args.require_cuda) else 1


if __name__ == "__main__":
    sys.exit(main())

"""kiln against its peers, with a roofline and plots, in one command.

    python -m benchmarks.run                    # the full default run (about 20 minutes on 2 cores)
    python -m benchmarks.run --quick            # a smoke run: 2 threads only, 2 repeats, short decode
    kiln bench --compare                        # the same, from the CLI (same options after --)

Options:
  --threads 2 1          thread counts; each is one interleaved pass over every system (default: 2 1)
  --systems NAME ...     only these systems (LLM and encoder names below; default: all available)
  --repeats 5            timed rounds after one warm-up round; medians are reported
  --prompts 32 128 512   prompt lengths for prefill tok/s and TTFT
  --depths 0 512         KV depths for decode tok/s (depth d: a d-token prompt is prefilled first;
                         depth 0 starts from a one-token prompt)
  --decode-tokens 32     decode steps timed at each depth (ort-raw-fp32: --raw-decode-tokens 4,
                         since it recomputes the whole sequence per token)
  --no-llm, --no-encoder, --no-rss, --no-plots, --no-roofline   leave a part out
  --workdir DIR          where the artifacts and peer models are built (default $KILN_CACHE/bench)

LLM systems (SmolLM2-135M-Instruct, batch 1, greedy, identical prompt token ids):
  kiln-ort-fp32/int8/int4   kiln artifacts (recipes fp32, int8, int4), compiled on first use and
                            recompiled when the preset recipe or kiln's source changed
  kiln-tvm-fp32             kiln's TVM artifact (fp32; prefill in 128-token chunks, decode over a
                            256-slot static cache, so it runs only the cells that fit: no 512);
                            compiled with the tuning records already in the database (no new
                            tuning in this run: `kiln compile ... -b tvm --tune-minutes N` adds them).
  ort-raw-fp32              the raw torch.export ONNX in plain ORT (no kiln passes, no KV cache)
  pytorch-eager             transformers' model with its KV cache (what generate() runs)
  ort-genai-fp32/int4       onnxruntime-genai's model builder output (needs onnxruntime-genai)
  llama.cpp-q4_1            the GGUF kiln compiles from, through llama-cpp-python
  llama.cpp-q4_0            the same GGUF re-quantized to Q4_0 (llama_model_quantize); optional
Encoder systems (all-MiniLM-L6-v2): kiln-ort-fp32, kiln-ort-int8 (recipe int8-dynamic),
kiln-tvm-fp32 (batch-1, 128-token
functions: shorter inputs are padded to 128 and batch rows run one after another), ort-raw-fp32,
pytorch-eager.
Peers that are not installed (or fail to build) are skipped with a message.

Metrics: TTFT and prefill tok/s per prompt length, decode tok/s per depth, artifact size,
compile / build time, peak RSS (each system alone in a child process: load, prefill 512,
decode 16); encoders: batch-1 latency at seq 16 and 128, throughput at batch 32 x seq 128.
Roofline (same run): the machine's read bandwidth and numpy sgemm FLOP/s (kiln.roofline),
each system's decode bytes per token / bandwidth as a fraction of its measured time, and its
prefill FLOP/s as a fraction of the peak.

Output: benchmarks/RESULTS.md (sections speed-llm, speed-encoder, roofline; the other
sections are left alone), benchmarks/results.json, and PNGs in benchmarks/plots/
(benchmarks.plots; needs matplotlib, skipped with a message otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import sys
import time
from pathlib import Path

from benchmarks.artifacts import (
    ROOT,
    Skip,
    prepare_encoder,
    prepare_llm,
    tokenizer_path,
)
from benchmarks.render import (
    encoder_section,
    llm_section,
    remove_unsectioned,
    roofline_section,
)
from benchmarks.roofline import add_roofline, measure_ceilings
from benchmarks.systems import ENCODER_SYSTEMS, LLM_SYSTEMS, open_encoder, open_llm
from benchmarks.timing import (
    Plan,
    probe_main,
    probe_rss,
    run_encoder,
    run_llm,
    versions,
)
from kiln.bench import text_ids

OUT = ROOT / "benchmarks"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="Thread counts (default: 2 1; --quick: 2).")
    parser.add_argument("--systems", nargs="+", default=None, help="Only these systems.")
    parser.add_argument("--repeats", type=int, default=None, help="Timed rounds after the warm-up (default 5; --quick: 2).")
    parser.add_argument("--prompts", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 512])
    parser.add_argument("--decode-tokens", type=int, default=None, help="Default 32; --quick: 8.")
    parser.add_argument("--raw-decode-tokens", type=int, default=None, help="Default 4; --quick: 2.")
    parser.add_argument("--quick", action="store_true", help="A smoke run: 2 threads, 2 repeats, short decode.")
    parser.add_argument("--no-llm", action="store_true")
    parser.add_argument("--no-encoder", action="store_true")
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--no-roofline", action="store_true")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="Print the tables; leave RESULTS.md, results.json and the plots alone.")
    parser.add_argument("--workdir", type=Path, default=None, help="Where models are built (default: $KILN_CACHE/bench).")
    parser.add_argument("--probe", nargs=3, metavar=("KIND", "NAME", "SPEC"), help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    threads = args.threads or ([2] if args.quick else [2, 1])
    if args.probe:
        kind, name, spec = args.probe
        return probe_main(kind, name, json.loads(spec), threads[0])
    plan = Plan(prompts=sorted(args.prompts), depths=sorted(args.depths),
                decode_tokens=args.decode_tokens or (8 if args.quick else 32),
                raw_decode_tokens=args.raw_decode_tokens or (2 if args.quick else 4),
                repeats=args.repeats or (2 if args.quick else 5))
    from kiln.models.cache import cache_dir

    from benchmarks.report import machine, machine_line

    workdir = args.workdir or cache_dir("bench")
    workdir.mkdir(parents=True, exist_ok=True)
    wanted = set(args.systems) if args.systems else None
    unknown = (wanted or set()) - set(LLM_SYSTEMS) - set(ENCODER_SYSTEMS)
    if unknown:
        print(f"error: unknown systems {sorted(unknown)} (LLM: {', '.join(LLM_SYSTEMS)}; encoder: {', '.join(ENCODER_SYSTEMS)})")
        return 2
    t_start = time.perf_counter()
    data: dict = {"date": str(datetime.date.today()), "plan": dataclasses.asdict(plan), "threads": threads,
                  "machine": machine(), "machine_line": machine_line(), "versions": versions(),
                  "llm": {}, "encoder": {}, "specs": {}, "encoder_specs": {}, "rss": {}, "encoder_rss": {},
                  "roofline": {}, "skipped": {}}

    # Build everything first (cached in workdir), then time.
    llm_names = [] if args.no_llm else [n for n in LLM_SYSTEMS if wanted is None or n in wanted]
    enc_names = [] if args.no_encoder else [n for n in ENCODER_SYSTEMS if wanted is None or n in wanted]
    print("preparing systems ...", flush=True)
    for name in llm_names:
        try:
            data["specs"][name] = prepare_llm(name, workdir)
        except Skip as exc:
            print(f"  skipped {name}: {exc}", flush=True)
            data["skipped"][name] = str(exc)
    for name in enc_names:
        try:
            data["encoder_specs"][name] = prepare_encoder(name, workdir)
        except Skip as exc:
            print(f"  skipped encoder {name}: {exc}", flush=True)
            data["skipped"][f"encoder {name}"] = str(exc)

    ceilings: dict = {}
    if not args.no_roofline:
        measure_ceilings(ceilings, threads)

    ids: list[int] = []
    if data["specs"]:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_path()))
        ids = text_ids(lambda text: tok.encode(text).ids, max([*plan.prompts, *plan.depths, 1]))
    for t in threads:
        if data["specs"]:
            print(f"LLM, {t} thread(s): {', '.join(data['specs'])}", flush=True)
            systems = [open_llm(n, s, t) for n, s in data["specs"].items()]
            data["llm"][str(t)] = run_llm(systems, ids, plan, data["skipped"])
            del systems
            gc.collect()
        if data["encoder_specs"]:
            print(f"encoder, {t} thread(s): {', '.join(data['encoder_specs'])}", flush=True)
            encs = [open_encoder(n, s, t) for n, s in data["encoder_specs"].items()]
            data["encoder"][str(t)] = run_encoder(encs, plan, vocab=30522)  # BERT's vocabulary
            del encs
            gc.collect()

    if not args.no_rss:
        print("peak RSS, one child process per system ...", flush=True)
        for name, spec in data["specs"].items():
            data["rss"][name] = probe_rss("llm", name, spec, threads[0], workdir)
        for name, spec in data["encoder_specs"].items():
            data["encoder_rss"][name] = probe_rss("encoder", name, spec, threads[0], workdir)

    if ceilings:
        measure_ceilings(ceilings, threads)  # again: the best of both, on a machine shared with others
    if ceilings and data["llm"]:
        add_roofline(data, ceilings, threads, plan)

    data["seconds"] = round(time.perf_counter() - t_start, 1)
    command = "python -m benchmarks.run" + (" " + " ".join(argv if argv is not None else sys.argv[1:]) if (argv or sys.argv[1:]) else "")
    sections = {}
    if data["llm"]:
        sections["speed-llm"] = llm_section(data, command.strip())
    if data["encoder"]:
        sections["speed-encoder"] = encoder_section(data)
    if data["roofline"]:
        sections["roofline"] = roofline_section(data)
    for text in sections.values():
        print("\n" + text)
    if not args.no_write:
        from benchmarks.report import RESULTS, write_section

        remove_unsectioned(RESULTS)
        for name, text in sections.items():
            write_section(name, text)
        (OUT / "results.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"\nwrote benchmarks/RESULTS.md ({', '.join(sections)}) and benchmarks/results.json "
              f"in {data['seconds'] / 60:.1f} min")
    if not args.no_plots and not args.no_write:
        from benchmarks.plots import make_plots

        make_plots(data, OUT / "plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())

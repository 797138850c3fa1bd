"""Static QDQ activations (quantize-activations) against dynamic int8, on one model.

    python scripts/static_qdq_quality.py smollm2-135m [--calibration-windows 8] [--windows 4]
    python scripts/static_qdq_quality.py minilm-l6

Runs the npu-int8 recipe up to its quantize-weights step once (per-channel int8 weights after
SmoothQuant), then each variant on a copy of that model:
- dynamic int8: DynamicQuantizeMatMul, one activation scale per tensor computed at run time;
- static QDQ: calibrated ranges (minmax or the 99.99th percentile), 8 or 16 bits, with or
  without the attention products (Q·Kᵀ, P·V).
Causal LMs: perplexity on held-out Lee windows, relative to fp32; encoders: mean and min
cosine of the pooled embeddings to fp32. Graphs run as written (ORT optimizations off, like
the pipeline's checks). Calibration ranges are captured once and shared by the variants.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from kiln.corpus import calibration_corpus, default_corpus, text_feeds
from kiln.ir import load_model, summary
from kiln.models import get_source, prepare
from kiln.passes import create_pass, run_pipeline
from kiln.passes.numerics import log_softmax, run_ort
from kiln.passes.quantize_activations import QuantizeActivationsPass
from kiln.recipes import load_recipe

VARIANTS = [("static a8 minmax", dict(method="minmax")),
            ("static a8 percentile 99.99", dict(method="percentile")),
            ("static a8 minmax, attention in float", dict(method="minmax", attention=False)),
            ("static a8 percentile, attention in float", dict(method="percentile", attention=False)),
            ("static a16 minmax", dict(method="minmax", bits=16)),
            ("static a16 percentile 99.99", dict(method="percentile", bits=16))]


def measure(model, feeds, task, reference=None):
    """(metrics, first outputs): perplexity for a causal LM, cosine to `reference` for an encoder."""
    outputs = [run_ort(model, f)[model.graph.outputs[0].name] for f in feeds]
    if task == "causal-lm":
        nll = count = 0
        for feed, logits in zip(feeds, outputs):
            lp = log_softmax(logits[:, :-1])
            nll -= float(np.take_along_axis(lp, feed["input_ids"][:, 1:, None], axis=-1).sum())
            count += feed["input_ids"][:, 1:].size
        return {"ppl": math.exp(nll / count)}, outputs
    if reference is None:
        return {"cosine": 1.0, "cosine_min": 1.0}, outputs
    new, ref = (np.concatenate([o.reshape(-1, o.shape[-1]) for o in x]).astype(np.float64) for x in (outputs, reference))
    cos = np.sum(ref * new, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(new, axis=1))
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}, outputs


def adapted(feeds, passes, model):
    """Feeds for `model`'s signature (the KV cache inserted by one of `passes`)."""
    for p in passes:
        feeds = [p.adapt_feeds(f, model) for f in feeds]
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--windows", type=int, default=4)
    args = parser.parse_args()

    start = time.perf_counter()
    prepared = prepare(get_source(args.model), progress=False)
    model = load_model(prepared.path)
    signature = summary(model).inputs
    length = 256 if prepared.task == "causal-lm" else 128
    calib = text_feeds(prepared.tokenizer, signature, calibration_corpus(), samples=args.calibration_windows,
                       length=length)
    held_out = text_feeds(prepared.tokenizer, signature, default_corpus(), samples=args.windows, length=length)
    steps = load_recipe("npu-int8").steps
    names = [n for n, _ in steps]
    exact = [create_pass(n, p) for n, p in steps[:names.index("smooth-activations")]]
    model = run_pipeline(model, exact, None, progress=False).model
    calib, feeds = adapted(calib, exact, model), adapted(held_out, exact, model)
    base, reference = measure(model, feeds, prepared.task)
    rows = [("fp32", base)]
    for name in ("smooth-activations", "quantize-weights"):  # SmoothQuant, then per-channel int8 weights
        p = create_pass(name, dict(steps[names.index(name)][1]))
        p.calibration = calib
        p(model)
    rows.append(("int8 weights only (per channel)", measure(model, feeds, prepared.task, reference)[0]))

    dynamic = model.clone()
    create_pass("lower-dynamic-quantize-matmul")(dynamic)
    rows.append(("dynamic int8 (DynamicQuantizeMatMul)", measure(dynamic, feeds, prepared.task, reference)[0]))

    ranges: dict = {}
    capture = QuantizeActivationsPass._calibrate

    def shared(self, graph_model, values):  # one capture (with histograms) serves every variant
        missing = [v for v in values if v.name not in ranges]
        if missing:
            wide = QuantizeActivationsPass(method="percentile")
            wide.calibration = self.calibration
            ranges.update(capture(wide, graph_model, missing))
        return {v.name: ranges[v.name] for v in values}

    QuantizeActivationsPass._calibrate = shared
    for name, params in VARIANTS:
        variant = model.clone()
        p = QuantizeActivationsPass(**params)
        p.calibration = calib
        p(variant)
        rows.append((name, measure(variant, feeds, prepared.task, reference)[0]))
        print(f"  {name}: {rows[-1][1]}  ({time.perf_counter() - start:.0f} s)", flush=True)

    tokens = sum(f["input_ids"].size for f in feeds)
    print(f"\n{args.model}: {len(feeds)} held-out Lee windows ({tokens} tokens); calibration: "
          f"{len(calib)} windows of {length} tokens of lee.cor; {time.perf_counter() - start:.0f} s\n")
    if prepared.task == "causal-lm":
        print("| variant | PPL | ΔPPL |\n|---|---|---|")
        for name, v in rows:
            print(f"| {name} | {v['ppl']:.2f} | {v['ppl'] / base['ppl'] - 1:+.2%} |")
    else:
        print("| variant | mean cosine | min cosine |\n|---|---|---|")
        for name, v in rows:
            print(f"| {name} | {v['cosine']:.5f} | {v['cosine_min']:.5f} |")


if __name__ == "__main__":
    main()

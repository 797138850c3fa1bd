"""The speed benchmark's roofline: the machine's ceilings and each LLM system set against them.

`measure_ceilings` measures read bandwidth and sgemm FLOP/s (`kiln.roofline`); `add_roofline` works out
each system's per-token arithmetic and its decode and prefill fractions of those ceilings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from benchmarks.timing import Plan


def llm_arithmetic(name: str, spec: dict, fp32_layout):
    """Per-token arithmetic of what `name` runs (PyTorch: the fp32 weights with a KV cache)."""
    from kiln import roofline

    kind = spec["kind"]
    if kind == "kiln":
        return roofline.from_artifact(spec["path"])
    if kind == "raw":
        meta = json.loads((Path(spec["path"]).parent / "meta.json").read_text())
        return roofline.analyze(spec["path"], roofline.layout_from_config(meta, causal=True))
    if kind == "genai":
        return roofline.analyze(Path(spec["path"]) / "model.onnx", fp32_layout)
    if kind == "llama.cpp":
        return roofline.from_gguf(spec["path"], dataclasses.replace(fp32_layout, kv_dtype_bytes=2))  # f16 cache
    if kind == "torch":
        return None  # filled in from the fp32 export below
    return None


def roofline_rows(results: dict, arith: dict, ceiling, plan: Plan) -> dict:
    from kiln.roofline import bound

    rows = {}
    p = max(plan.prompts)
    for name, r in results.items():
        a = arith.get(name)
        if a is None:
            continue
        row: dict = {"weight_mb_per_token": round(a.weight_bytes_per_token / 1e6, 2),
                     "gflop_per_token": round(a.weight_flops_per_token / 1e9, 3)}
        for d in plan.depths:
            step = a.decode(d)
            b = bound(step["bytes"], step["flops"], ceiling)
            measured = r[f"decode_tok_s_{d}"]
            if measured is None:
                continue
            row[f"decode_{d}"] = {"mb_per_token": round(step["bytes"] / 1e6, 2), "gflop_per_token": round(step["flops"] / 1e9, 3),
                                  "intensity": round(b["intensity"], 3), "bound": b["bound"], "ceiling_tok_s": round(1 / b["seconds"], 1),
                                  "measured_tok_s": measured, "fraction": round(measured * b["seconds"], 3),
                                  "gb_s": round(measured * step["bytes"] / 1e9, 2)}
        if r[f"prefill_tok_s_{p}"] is None:
            rows[name] = row
            continue
        pre = a.prefill(p)
        b = bound(pre["bytes"], pre["flops"], ceiling)
        achieved = pre["flops"] / p * r[f"prefill_tok_s_{p}"] / 1e9
        row[f"prefill_{p}"] = {"gflop": round(pre["flops"] / 1e9, 2), "intensity": round(b["intensity"], 2), "bound": b["bound"],
                               "gflop_s": round(achieved, 1), "fraction_of_peak": round(achieved / ceiling.flops_gflop_s, 3)}
        rows[name] = row
    return rows


def measure_ceilings(ceilings: dict, threads: list[int]) -> None:
    from kiln.roofline import Ceiling, ceiling

    for t in threads:
        c = ceiling(t, fresh=True)
        if t in ceilings:
            c = Ceiling(max(c.bandwidth_gb_s, ceilings[t].bandwidth_gb_s), max(c.flops_gflop_s, ceilings[t].flops_gflop_s), t,
                        "measured before and after the timed runs, best of both")
        ceilings[t] = c
        print(f"roofline, {t} thread(s): {c.bandwidth_gb_s} GB/s read, {c.flops_gflop_s} GFLOP/s sgemm", flush=True)


def add_roofline(data: dict, ceilings: dict, threads: list[int], plan: Plan) -> None:
    """data["roofline"] (per thread count: the ceiling and each LLM system's row) and data["arithmetic"]."""
    from kiln.roofline import from_artifact

    fp32 = data["specs"].get("kiln-ort-fp32")
    fp32_arith = from_artifact(fp32["path"]) if fp32 else None
    arith = {}
    for name, spec in data["specs"].items():
        try:
            a = llm_arithmetic(name, spec, fp32_arith.layout if fp32_arith else None)
        except Exception as exc:  # noqa: BLE001 (a peer format the arithmetic does not read)
            print(f"  roofline: no arithmetic for {name}: {exc}")
            a = None
        arith[name] = a if a is not None else (fp32_arith if name == "pytorch-eager" else None)
    for t in threads:
        data["roofline"][str(t)] = {"ceiling": dataclasses.asdict(ceilings[t]),
                                    "systems": roofline_rows(data["llm"][str(t)], arith, ceilings[t], plan)}
    data["arithmetic"] = {n: a.as_dict() for n, a in arith.items() if a is not None}

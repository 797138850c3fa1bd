"""Tuning quantization scales end to end against the float model (used by quantize-weights).

After GPTQ or RTN has chosen every weight's integers, each block scale s of every
DequantizeLinear that pass wrote is trained as s·exp(t) (t starts at 0, so the start is
the layer-wise solution) by Adam on the calibration feeds, minimizing the divergence of the
quantized model's output from the float model's:
    causal LMs ("logits" output):  KL(p_float ‖ p_quant) of the next-token distribution, per position;
    anything else:                 ‖y − y_float‖² / ‖y_float‖² of the first output.
The integers stay fixed, so the format, size and kernels do not change. Layer-wise methods
see one projection at a time; this sees how the errors of all layers add up at the output,
which is where they hurt (cf. EfficientQAT's end-to-end step, which also trains only the
quantization parameters). The float teacher runs through ONNX Runtime before the rewrite;
the quantized model runs through `kiln.ir.torch_graph` for gradients.

Cost: one forward and backward pass of the model per step (SmolLM2-135M, 256 tokens:
about 4 s on 2 cores). Overfits small calibration sets: one real feed in eight is held
out, the step with the lowest held-out loss is kept, and both losses are reported. For LMs
with a KV cache, `sampled_feeds` adds text sampled from the float model itself (prompted
by the first tokens of the real feeds) to train on: as much as wanted, and it is the
distribution the model will be asked to reproduce.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx_ir as ir
import torch

from kiln.ir import KV_CACHE_METADATA
from kiln.ir.torch_graph import TorchGraph
from kiln.passes import calibration as calib
from kiln.passes.kv_layout import cache_feeds, sample_continuations


def teacher_outputs(model: ir.Model, feeds: list[dict]) -> tuple[str, list[torch.Tensor]]:
    """The first graph output on every feed, from the float model (log-probabilities for logits)."""
    name = model.graph.outputs[0].name
    out = []
    for arrays in calib.capture(model, feeds, [name]):
        y = torch.from_numpy(np.asarray(arrays[name], dtype=np.float32))
        out.append(torch.log_softmax(y, -1).half() if name == "logits" else y)
    return name, out


def _loss(name: str, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if name == "logits":
        t = target.float()
        return (t.exp() * (t - torch.log_softmax(y, -1))).sum(-1).mean()
    return (y - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


def split_feeds(real: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: one real feed in eight is held out (none below four)."""
    held = list(range(0, real, 8)) if real >= 4 else []
    return [i for i in range(real) if i not in held], held


def sampled_feeds(model: ir.Model, feeds: list[dict], count: int, seed: int = 0) -> list[dict]:
    """`count` more feeds like `feeds` (prefill, empty cache), continuing each real feed's first
    four tokens with text sampled from the model itself."""
    layout = json.loads(model.metadata_props[KV_CACHE_METADATA])
    length = feeds[0]["input_ids"].shape[1]
    prompts = np.concatenate([feeds[i % len(feeds)]["input_ids"][:1, :4] for i in range(count)])
    out = []
    for start in range(0, count, 8):  # batches of 8: fast through the cache, small in memory
        ids = sample_continuations(model, prompts[start:start + 8], length, seed + start)
        out.extend(cache_feeds(layout, row[None]) for row in ids)
    return out


def tune_scales(model: ir.Model, scales: list[ir.Value], feeds: list[dict], teacher: tuple[str, list],
                train: list[int], held: list[int], steps: int, lr: float, seed: int = 0) -> dict[str, float]:
    """Train `scales` (initializers of the model) in place on feeds[train], keeping the step
    with the lowest loss on feeds[held]; returns the losses before and after."""
    name, targets = teacher
    graph = TorchGraph(model)
    base = {v.name: torch.from_numpy(np.asarray(v.const_value.numpy(), dtype=np.float32)) for v in scales}
    logs = {n: torch.zeros_like(s, requires_grad=True) for n, s in base.items()}
    train = train or held
    feeds_t = [{k: torch.from_numpy(np.asarray(v)) for k, v in f.items()} for f in feeds]

    def loss_on(i):
        params = {n: base[n] * torch.exp(logs[n]) for n in base}
        return _loss(name, graph(feeds_t[i], params, [name])[0], targets[i])

    def evaluate(indices):
        with torch.no_grad():
            return float(np.mean([loss_on(i).item() for i in indices]))

    check = held or train
    first = evaluate(check)
    best, best_logs = first, {n: t.detach().clone() for n, t in logs.items()}
    opt = torch.optim.Adam(logs.values(), lr=lr)
    rng = np.random.default_rng(seed)
    every = max(steps // 6, 1)
    train_loss = []
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay to zero
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = loss_on(int(rng.choice(train)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_loss.append(loss.item())
        if (step + 1) % every == 0 or step == steps - 1:
            current = evaluate(check)
            if current < best:
                best, best_logs = current, {n: t.detach().clone() for n, t in logs.items()}
    for v in scales:
        tuned = (base[v.name] * torch.exp(best_logs[v.name])).numpy().astype(np.float32)
        v.const_value = ir.tensor(tuned, name=v.name)
    return {"tune_heldout_loss_before": round(first, 5), "tune_heldout_loss_after": round(best, 5),
            "tune_train_loss_last": round(float(np.mean(train_loss[-every:])), 5) if train_loss else first}

"""Tuning quantization scales end to end against the float model (used by quantize-weights).

After GPTQ or RTN has chosen every weight's integers, each scale s that pass wrote (the block
scales, or with compact scales each output channel's fp32 step, the uint8 levels fixed) is
trained as s·exp(t) (t starts at 0, so the start is the layer-wise solution) by Adam on the
calibration feeds, minimizing the divergence of the quantized model's output from the float
model's:
    causal LMs ("logits" output):  KL(p_float ‖ p_quant) of the next-token distribution, per position;
    anything else:                 ‖y − y_float‖² / ‖y_float‖² of the first output.
The integers stay fixed, so the format, size and kernels do not change. Layer-wise methods
see one projection at a time; this sees how the errors of all layers add up at the output,
which is where they hurt (cf. EfficientQAT's end-to-end step, which also trains only the
quantization parameters). The float teacher runs through ONNX Runtime before the rewrite;
the quantized model runs through `kiln.ir.torch_graph` for gradients. The training loop
(`fit`) is shared with the distill pass, which trains the weights themselves.

Cost: one forward and backward pass of the model per step (SmolLM2-135M, 256 tokens:
about 4 s on 2 cores). Overfits small calibration sets (SmolLM2 on 4k tokens: training KL
0.05, held-out 0.13): one feed in eight is held out, the step with the lowest held-out loss
is kept (the untuned scales if none is lower), and both losses are reported. Tried and
dropped: training on text sampled from the float model as well (48 × 256 tokens): held-out
KL 0.144 against 0.130 without, the same Lee perplexity within noise.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import torch

from kiln.ir.torch_graph import TorchGraph
from kiln.passes.numerics import ort_session


class Teacher:
    """The float model's first output on each feed (log-probabilities for logits), run through
    ONNX Runtime once, before the weights are rewritten, and kept on disk: a vocabulary of 150k
    over 64 feeds of 256 tokens is 10 GB in float32, and a session open through the tuning would
    hold another copy of the float weights. `teacher(i)` reads feed i's output back."""

    def __init__(self, model: ir.Model, feeds: list[dict]):
        self.name = model.graph.outputs[0].name
        self._dir = tempfile.TemporaryDirectory(prefix="kiln-teacher-")
        session = ort_session(model)
        inputs = {i.name for i in session.get_inputs()}
        for i, feed in enumerate(feeds):
            y = session.run([self.name], {k: v for k, v in feed.items() if k in inputs})[0]
            np.save(self._path(i), np.asarray(y, dtype=np.float32))
        del session

    def _path(self, i: int) -> str:
        return os.path.join(self._dir.name, f"{i}.npy")

    def __call__(self, i: int) -> torch.Tensor:
        y = torch.from_numpy(np.load(self._path(i)))
        return torch.log_softmax(y, -1) if self.name == "logits" else y

    def loss(self, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.name == "logits":
            return (target.exp() * (target - torch.log_softmax(y, -1))).sum(-1).mean()
        return relative_mse(y, target)


def relative_mse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (y - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


def split_feeds(count: int, most: int = 16) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: one feed in eight is held out (none below four, at most `most`:
    every check runs them all)."""
    held = list(range(0, count, 8))[:most] if count >= 4 else []
    return [i for i in range(count) if i not in held], held


def fit(model: ir.Model, trainable: dict[str, torch.Tensor], overrides: Callable[[], dict[str, torch.Tensor]],
        feeds: list[dict], teacher: Teacher, train: list[int], held: list[int], steps: int, lr: float,
        seed: int = 0, checks: int = 6, weight_decay: float = 0.0) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the tensors of `trainable` (leaves with requires_grad) by Adam with a cosine-decayed
    learning rate, one feed of `feeds[train]` per step; `overrides()` maps them to the
    initializers they replace. The held-out loss (feeds[held], or the training feeds when none
    are held out) is measured before training and `checks` times during it; returns the state
    with the lowest (the start if none is lower) and {"heldout_before", "heldout_after",
    "train_last", "curve": [[step, train loss, held-out loss], ...]}. Raises UnsupportedOp
    (before any training) when the graph has an op torch_graph cannot run."""
    graph = TorchGraph(model)
    name = teacher.name
    train = train or held
    check = held or train

    def loss_on(i):
        return teacher.loss(graph(feeds[i], overrides(), [name])[0], teacher(i))

    def evaluate(indices):
        with torch.no_grad():
            return float(np.mean([loss_on(i).item() for i in indices]))

    def snapshot():
        return {n: t.detach().clone() for n, t in trainable.items()}

    first = evaluate(check)
    best, best_state = first, snapshot()
    opt = torch.optim.AdamW(trainable.values(), lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    every = max(steps // max(checks, 1), 1)
    train_loss, curve = [], [[0, None, _sig(first)]]
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
            curve.append([step + 1, _sig(float(np.mean(train_loss[-every:]))), _sig(current)])
            if current < best:
                best, best_state = current, snapshot()
    return best_state, {"heldout_before": _sig(first), "heldout_after": _sig(best),
                        "train_last": curve[-1][1] if train_loss else _sig(first), "curve": curve}


def _sig(x: float) -> float:
    return float(f"{x:.5g}")


def tune_scales(model: ir.Model, scales: list[ir.Value], feeds: list[dict], teacher: Teacher,
                train: list[int], held: list[int], steps: int, lr: float, seed: int = 0) -> dict[str, float]:
    """Train `scales` (initializers of the model) in place on feeds[train], keeping the step
    with the lowest loss on feeds[held]; returns the losses before and after. Raises
    UnsupportedOp (before any change) when the graph has an op torch_graph cannot run."""
    base = {v.name: torch.from_numpy(np.asarray(v.const_value.numpy(), dtype=np.float32)) for v in scales}
    logs = {n: torch.zeros_like(s, requires_grad=True) for n, s in base.items()}
    best, losses = fit(model, logs, lambda: {n: base[n] * torch.exp(logs[n]) for n in base}, feeds, teacher,
                       train, held, steps, lr, seed)
    for v in scales:
        tuned = (base[v.name] * torch.exp(best[v.name])).numpy().astype(np.float32)
        v.const_value = ir.tensor(tuned, name=v.name)
    return {"tune_heldout_loss_before": losses["heldout_before"], "tune_heldout_loss_after": losses["heldout_after"],
            "tune_train_loss_last": losses["train_last"]}

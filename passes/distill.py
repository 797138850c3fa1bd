"""Distillation: train the float weights that a lossy structural pass left, against the source.

    W[K, N] (every float MatMul weight but the LM head's)   trained by AdamW on calibration text
  ->                                                          so that the model's output follows
    W' = W + ΔW                                               the source model's output:
        loss="kl":     KL(p_source ‖ p_model) of the next-token distribution, per position
                       (the default for a "logits" output);
        loss="cosine": 1 − cos(y, y_source) along the last axis (sentence embeddings; the
                       default for any other output);
        loss="mse":    ‖y − y_source‖² / ‖y_source‖².

`rank=0` trains the weights themselves; `rank=r` trains LoRA-style deltas ΔW = U[K, r]·V[r, N]
(U random, V zero, so training starts at the given model) and adds them to the weights at the
end: fewer trained numbers, less overfitting; the graph and its size do not change either way.

The teacher is the source model before the first pass (the pipeline runs it once on the
calibration feeds, `KilnPass.uses_teacher`), so distillation heals what every earlier lossy pass
removed: pruned MLP channels or heads, dropped layers, low-rank factors. Its outputs wait on disk
(windows × tokens × vocabulary × 4 bytes: SmolLM2 on 256 windows of 256 tokens, 13 GB in the
temporary directory). One calibration feed in eight (at most 16) is held out: the held-out loss is measured before training and `checks` times during it,
and the weights of the lowest held-out loss are kept (the given ones if none is lower, then the
pass changes nothing and says so). The record gives the steps, the loss curve (step, training
loss, held-out loss) and the held-out loss before and after.

Runs the graph in torch (`kiln.ir.torch_graph`): place it before insert-kv-cache and before
quantize-weights (int4 then rounds the healed weights). Cost per step: one forward and backward
pass over one feed (SmolLM2-135M at 256 tokens: about 3 s on 2 cores, checks included). Not handled: weights read
by a Gather (embedding tables) or by the LM head (a tied table would be untied and stored twice),
weights stored in a type other than float32, hidden-state matching at layer boundaries.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.errors import KilnError
from kiln.passes.analysis.linear import weight_reads
from kiln.passes.base import KilnPass
from kiln.passes.calibration import require
from kiln.passes.registry import register_pass

LOSSES = ("auto", "kl", "cosine", "mse")


class DistillError(KilnError):
    pass


@register_pass("distill")
class DistillPass(KilnPass):
    exact = False
    uses_calibration = True
    uses_teacher = True

    def __init__(self, steps: int = 200, lr: float = 0.0, rank: int = 0, loss: str = "auto",
                 include_lm_head: bool = False, checks: int = 8, weight_decay: float = 0.0, seed: int = 0,
                 metric: str = "kl", budget: float = 5.0):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got '{loss}'")
        if steps < 1 or checks < 1:
            raise ValueError("steps and checks must be >= 1")
        self.steps, self.rank, self.loss, self.checks = steps, rank, loss, checks
        # AdamW's step: whole weights move little per step, low-rank deltas start from zero
        self.lr = lr or (3e-5 if rank == 0 else 1e-3)
        self.include_lm_head, self.weight_decay, self.seed = include_lm_head, weight_decay, seed
        self.metric, self.budget = metric, budget

    def call(self, model: ir.Model):
        import torch

        from kiln.ir.torch_graph import UnsupportedOp
        from kiln.passes.scale_tuning import fit, split_feeds

        feeds = list(require(self.calibration, "distill"))
        if self.teacher is None:
            raise DistillError("distill needs the source model's outputs: run it in a kiln pipeline, with calibration")
        teacher = _WithLoss(self.teacher, self.loss)
        weights, rejected = self._weights(model)
        if not weights:
            return self.result(model, modified=False, rejected=rejected, warnings=["no float weight to train"])

        base = {v.name: torch.from_numpy(np.array(v.const_value.numpy(), dtype=np.float32)) for v in weights}
        gen = torch.Generator().manual_seed(self.seed)
        if self.rank:
            deltas = {}
            for n, w in base.items():
                r = min(self.rank, *w.shape)
                deltas[n + "/u"] = (torch.randn(w.shape[0], r, generator=gen) / w.shape[0] ** 0.5).requires_grad_()
                deltas[n + "/v"] = torch.zeros(r, w.shape[1], requires_grad=True)
            trainable = deltas

            def overrides():
                return {n: w + deltas[n + "/u"] @ deltas[n + "/v"] for n, w in base.items()}
        else:
            trainable = {n: w.clone().requires_grad_() for n, w in base.items()}

            def overrides():
                return trainable
        train, held = split_feeds(len(feeds))
        try:
            best, losses = fit(model, trainable, overrides, feeds, teacher, train, held, self.steps, self.lr,
                               self.seed, self.checks, self.weight_decay)
        except UnsupportedOp as exc:
            raise DistillError(f"the graph cannot be trained in torch: {exc}") from None
        stats = {"weights_trained": len(weights), "params_trained": int(sum(t.numel() for t in trainable.values())),
                 "steps": self.steps, "lr": self.lr, "loss": teacher.kind, "feeds_train": len(train),
                 "feeds_held_out": len(held), **{f"loss_{k}": v for k, v in losses.items()}}
        if losses["heldout_after"] >= losses["heldout_before"]:
            return self.result(model, modified=False, stats=stats, rejected=rejected,
                               warnings=["distillation did not lower the held-out loss: weights kept as they were"])
        with torch.no_grad():
            for v in weights:
                w = base[v.name] + best[v.name + "/u"] @ best[v.name + "/v"] if self.rank else best[v.name]
                v.const_value = ir.tensor(w.numpy().astype(np.float32), name=v.name)
        return self.result(model, modified=True, stats=stats, rejected=rejected)

    def _weights(self, model: ir.Model) -> tuple[list[ir.Value], list[str]]:
        """The float32 2-D initializers that only MatMuls read (the LM head's only if asked)."""
        weights, rejected = [], []
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or len(tensor.shape) != 2:
                continue
            reads = weight_reads(value)
            if isinstance(reads, str) or not reads:
                continue
            if any(r.kind != "matmul" for r in reads):
                rejected.append(f"{value.name}: read by a Gather (an embedding table): not trained")
            elif any(r.head for r in reads) and not self.include_lm_head:
                rejected.append(f"{value.name}: the LM head: not trained (include_lm_head=true trains it)")
            elif tensor.dtype != ir.DataType.FLOAT:
                rejected.append(f"{value.name}: stored as {tensor.dtype.name}, not float32: not trained")
            else:
                weights.append(value)
        return weights, rejected


class _WithLoss:
    """The pipeline's teacher with the pass's loss: `teacher(i)` is the target of feed i."""

    def __init__(self, teacher, loss: str):
        self.teacher, self.name = teacher, teacher.name
        self.kind = loss if loss != "auto" else "kl" if teacher.name == "logits" else "cosine"
        if self.kind == "kl" and teacher.name != "logits":
            raise DistillError(f"loss='kl' needs a 'logits' output; this model's first output is '{teacher.name}'")

    def __call__(self, i: int):
        return self.teacher(i)

    def loss(self, y, target):
        import torch

        from kiln.passes.scale_tuning import relative_mse

        if self.kind == "kl":
            return self.teacher.loss(y, target)
        if self.name == "logits":  # the target is the source's log-probabilities: compare like with like
            y = torch.log_softmax(y, -1)
        if self.kind == "cosine":
            return (1 - torch.nn.functional.cosine_similarity(y, target, dim=-1)).mean()
        return relative_mse(y, target)

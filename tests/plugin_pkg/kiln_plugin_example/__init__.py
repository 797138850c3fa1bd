"""Example kiln plugin: two passes published through the `kiln.passes` entry-point group."""

import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from kiln import KilnPass


class CountOpsPass(KilnPass):
    """Counts nodes of one op type; changes nothing."""

    def __init__(self, op_type: str = "MatMul"):
        super().__init__()
        self.op_type = op_type

    def call(self, model: ir.Model):
        count = sum(n.op_type == self.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))
        return self.result(model, modified=False, stats={"count": count})


class WaitPass(KilnPass):
    """Touches `marker` then sleeps: lets tests interrupt a compile mid-way."""

    def __init__(self, seconds: float = 1.0, marker: str = ""):
        super().__init__()
        self.seconds = seconds
        self.marker = marker

    def call(self, model: ir.Model):
        if self.marker:
            Path(self.marker).touch()
        time.sleep(self.seconds)
        return self.result(model, modified=False)


class BoostTokenPass(KilnPass):
    """Adds `amount` to one token's logit: a lossy pass that surely hurts perplexity."""

    exact = False
    metric = "kl"
    budget = float("inf")

    def __init__(self, token: int = 0, amount: float = 20.0):
        super().__init__()
        self.token = token
        self.amount = amount

    def call(self, model: ir.Model):
        logits = model.graph.outputs[0]
        vocab = logits.shape[-1]
        bias = np.zeros(vocab, dtype=np.float32)
        bias[self.token] = self.amount
        const = ir.val(f"{logits.name}.boost", const_value=ir.tensor(bias))
        model.graph.register_initializer(const)
        add = ir.node("Add", [logits, const], num_outputs=1)
        add.outputs[0].dtype, add.outputs[0].shape = logits.dtype, logits.shape
        model.graph.append(add)
        index = list(model.graph.outputs).index(logits)
        logits.name, add.outputs[0].name = f"{logits.name}.raw", logits.name
        model.graph.outputs[index] = add.outputs[0]
        return self.result(model, modified=True, stats={"boosted": 1})

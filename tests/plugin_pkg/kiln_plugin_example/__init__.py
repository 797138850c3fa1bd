"""Example kiln plugin: two passes published through the `kiln.passes` entry-point group."""

import time
from pathlib import Path

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

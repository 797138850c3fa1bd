"""Value, constant and initializer helpers over onnx_ir that several passes need.

- `const_array` / `is_const`: the constant behind a value (an initializer or a Constant node);
- `param_count`: elements of every initializer (as `kiln.ir.summary` counts parameters);
- `new_initializer` / `set_const_input` / `unique_name`: add constants without name clashes;
- `ancestors` / `descendants` / `depends_on`: reachability over data edges.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir


def param_count(model: ir.Model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)


def const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    p = value.producer()
    if p is not None and p.op_type == "Constant" and "value" in p.attributes:
        return p.attributes["value"].value.numpy()
    return None


def is_const(value: ir.Value | None) -> bool:
    return value is not None and (value.const_value is not None
                                  or (value.producer() is not None and value.producer().op_type == "Constant"))


def unique_name(graph: ir.Graph, name: str) -> str:
    candidate, i = name, 0
    while candidate in graph.initializers:
        i += 1
        candidate = f"{name}.{i}"
    return candidate


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """A new initializer named `name` (or `name.1`, ... when taken)."""
    value = ir.val(unique_name(graph, name), const_value=ir.tensor(np.asarray(array, order="C"), dtype=dtype))
    graph.register_initializer(value)
    return value


def set_const_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, suffix: str) -> ir.Value:
    """Give `node` a new initializer as input `index` (the old one is left for dead-code removal)."""
    old = node.inputs[index]
    base = (old.name if old is not None and old.name else node.name or "w") + suffix
    value = new_initializer(graph, base, array)
    node.replace_input_with(index, value)
    return value


def remove_unused_initializers(model: ir.Model) -> None:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)


# ---------------------------------------------------------------- reachability

def ancestors(values: Iterable[ir.Value], stop: set[ir.Value] | None = None) -> set[ir.Node]:
    stop = stop or set()
    seen: set[ir.Node] = set()
    stack = [v for v in values if v not in stop]
    while stack:
        p = stack.pop().producer()
        if p is None or p in seen:
            continue
        seen.add(p)
        stack.extend(i for i in p.inputs if i is not None and i not in stop)
    return seen


def descendants(values: Iterable[ir.Value]) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = list(values)
    while stack:
        for use in stack.pop().uses():
            if use.node not in seen:
                seen.add(use.node)
                stack.extend(use.node.outputs)
    return seen


def depends_on(value: ir.Value, source: ir.Value, limit: int = 4000) -> bool:
    stack, seen = [value], set()
    while stack and len(seen) < limit:
        v = stack.pop()
        if v is source:
            return True
        p = v.producer()
        if p is None or p in seen:
            continue
        seen.add(p)
        stack.extend(i for i in p.inputs if i is not None and not is_const(i))
    return False

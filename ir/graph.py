"""A networkx view of a graph, for algorithms onnx_ir does not provide
(reachability, dominators, subgraph extraction)."""

from __future__ import annotations

import networkx as nx
import onnx_ir as ir


def as_networkx(graph: ir.Graph) -> nx.MultiDiGraph:
    """Nodes are `ir.Node` objects; an edge producer -> consumer carries `value` (the ir.Value).

    Graph inputs and initializers have no producer, so they appear only as edge-less
    sources; use `value.uses()` to reach their consumers.
    """
    g = nx.MultiDiGraph()
    for node in graph:
        g.add_node(node)
    for node in graph:
        for value in node.outputs:
            for use in value.uses():
                if use.node.graph is graph:
                    g.add_edge(node, use.node, value=value, index=use.idx)
    return g

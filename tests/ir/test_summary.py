import networkx as nx

from conftest import tiny_graph
from kiln.ir import as_networkx, dims, infer_shapes, is_static, summary


def test_summary_counts_ops_parameters_and_bytes():
    s = summary(tiny_graph())
    assert s.ops == {"MatMul": 1, "Add": 1, "Relu": 1}
    assert s.nodes == 3
    assert s.parameters == 12 + 3
    assert s.bytes_by_dtype == {"float": 15 * 4}
    assert s.inputs == [{"name": "x", "dtype": "float", "shape": ["N", 4]}]
    assert s.outputs[0]["name"] == "y"


def test_summary_of_a_real_export(tiny_llama_ir, prepared):
    s = summary(tiny_llama_ir)

    from kiln.models.tiny import build

    torch_params = sum(p.numel() for p in build("tiny-llama").parameters())
    # Tied embeddings are stored once; the export may add small constants (RoPE inv_freq).
    assert torch_params - 64 * 320 <= s.parameters <= torch_params + 1000
    assert s.ops["MatMul"] >= 2 * 7


def test_networkx_view_has_an_edge_per_use():
    model = tiny_graph()
    g = as_networkx(model.graph)
    mm, add, relu = list(model.graph)
    assert set(g.nodes) == {mm, add, relu}
    assert g.number_of_edges() == 2
    assert nx.is_directed_acyclic_graph(g)
    assert list(nx.topological_sort(g)) == [mm, add, relu]
    assert g.get_edge_data(mm, add)[0]["value"] is mm.outputs[0]


def test_shape_helpers():
    model = tiny_graph()
    x = model.graph.inputs[0]
    assert dims(x) == ("N", 4)
    assert not is_static(x)
    w = model.graph.initializers["W"]
    assert is_static(w)
    mm = list(model.graph)[0]
    mm.outputs[0].shape = None
    infer_shapes(model)
    assert dims(list(model.graph)[0].outputs[0]) == ("N", 3)

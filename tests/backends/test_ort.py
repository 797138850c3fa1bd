import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import kiln
from kiln.manifest import SCHEMA_VERSION


@pytest.mark.slow  # the default int4 recipe tunes its scales: about a minute of CPU for tiny-llama
def test_artifact_layout_and_manifest(tmp_path, prepared):
    prepared("tiny-llama")
    result = kiln.compile("tiny-llama", tmp_path / "a", progress=False)
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert files == {"model.onnx", "model.onnx.data", "kiln.json", "tokenizer.json"}
    m = json.loads((tmp_path / "a" / "kiln.json").read_text())
    assert m == json.loads(json.dumps(result.manifest, default=str))
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["task"] == "causal-lm"
    assert len(m["source"]["sha256"]) == 64
    assert m["recipe"]["name"] == "int4"  # the default for a causal LM on the cpu
    assert "com.microsoft::MatMulNBits" in m["summary"]["artifact"]["ops"]
    assert m["target"]["name"] == "cpu" and m["target"]["threads"] >= 1
    assert m["backend"]["session"]["providers"] == ["CPUExecutionProvider"]
    assert m["io"]["inputs"][:3] == [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_sequence"]},
        {"name": "position_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
    ]
    assert m["io"]["inputs"][3] == {"name": "past_key_values.0.key", "dtype": "float", "shape": ["batch", 2, "past_sequence", 16]}
    assert [o["name"] for o in m["io"]["outputs"]] == ["logits"] + [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert m["kv_cache"]["num_layers"] == 2 and m["kv_cache"]["sequence_axis"] == 2
    lowering = m["backend"]["lowering"]
    assert lowering[:4] == ["fuse-rms-norm", "fuse-layer-norm", "fuse-gelu", "fuse-attention"]
    assert [r["name"] for r in m["passes"]] == [s["name"] for s in m["recipe"]["passes"]] + lowering
    assert m["summary"]["artifact"]["nodes"] < m["summary"]["source"]["nodes"]
    assert m["generation"]["eos_token_ids"] == [256]
    assert m["compile"]["artifact_check"]["max_rel"] <= 1e-4
    # the artifact opens in a plain ORT session, no kiln needed
    sess = ort.InferenceSession(str(tmp_path / "a" / "model.onnx"), providers=["CPUExecutionProvider"])
    empty = np.zeros((1, 2, 0, 16), dtype=np.float32)
    feeds = {"input_ids": np.array([[1, 2, 3]], dtype=np.int64), "attention_mask": np.ones((1, 3), dtype=np.int64),
             "position_ids": np.array([[0, 1, 2]], dtype=np.int64)}
    feeds.update({f"past_key_values.{i}.{k}": empty for i in range(2) for k in ("key", "value")})
    logits, present_key, *_ = sess.run(None, feeds)
    assert logits.shape == (1, 3, 320) and present_key.shape == (1, 2, 3, 16)


def test_compile_an_onnx_file(tmp_path, prepared):
    result = kiln.compile(str(prepared("tiny-gpt2").path), tmp_path / "b", recipe="fp32", progress=False)
    assert result.manifest["task"] == "causal-lm"  # read from the graph: input_ids -> logits [B, S, V]
    assert result.manifest["kv_cache"]["num_layers"] == 2
    assert result.manifest["tokenizer"] == "tokenizer.json"  # the one beside the file
    assert result.manifest["source"]["source"] == "model.onnx"
    assert all(r["delta"] is not None for r in result.manifest["passes"])


def test_compile_any_module_with_example_inputs(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    result = kiln.compile(net, tmp_path / "c", example_inputs=(x,), progress=False)
    art = kiln.load(result.path)
    assert art.input_names == ["input"]  # the name of Sequential.forward's parameter
    (y,) = art.session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(y, net(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert result.manifest["passes"][0]["delta"]["max_rel"] <= 1e-4
    # the same graph as an .onnx file: kiln makes float sample inputs itself
    again = kiln.compile(str(result.path / "model.onnx"), tmp_path / "d", progress=False)
    (y2,) = kiln.load(again.path).session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-6)


def test_module_export_failure_is_a_clear_error(tmp_path):
    import pytest

    from kiln.errors import KilnError

    net = torch.nn.Linear(4, 4)
    with pytest.raises(KilnError, match="torch.export to ONNX failed"):
        kiln.compile(net, tmp_path / "d", example_inputs={"not_an_arg": torch.randn(2, 4)}, progress=False)
    assert not (tmp_path / "d").exists()

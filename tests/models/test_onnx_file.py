"""An .onnx file exported elsewhere, with its tokenizer and config beside it: the task read
from the graph, an Optimum-style causal LM (mask and position inputs, no cache) cached by
kiln's own pass, an encoder's last_hidden_state pooled."""

import json
import warnings

import numpy as np
import pytest
import torch
import transformers

import kiln
from conftest import assert_nothing_left, assert_one_line_error, run_kiln
from kiln.models import tiny


class _Optimum(torch.nn.Module):
    """What `optimum-cli export onnx --task text-generation` gives: three inputs, logits out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits


class _Hidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _export(module, inputs, names, output, path):
    axes = {k: {0: "batch", 1: "sequence"} for k in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args=(), kwargs=inputs, dynamo=True, input_names=names,
                                    output_names=[output], dynamic_shapes=axes)
    program.save(str(path))


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, initializer_range=0.2, eos_token_id=tiny.EOS,
                                      pad_token_id=tiny.EOS, bos_token_id=None)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.slow
def test_an_optimum_style_causal_lm_gets_kilns_cache(llama, tmp_path):
    folder = tmp_path / "exported"
    folder.mkdir()
    ids = torch.zeros(2, 8, dtype=torch.int64)
    _export(_Optimum(llama), {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                              "position_ids": torch.arange(8).repeat(2, 1)},
            ["input_ids", "attention_mask", "position_ids"], "logits", folder / "model.onnx")
    llama.config.save_pretrained(folder)
    tiny.byte_tokenizer(bert_style=False).save(str(folder / "tokenizer.json"))
    m = kiln.compile(str(folder / "model.onnx"), tmp_path / "out", recipe="fp32", progress=False).manifest
    assert m["task"] == "causal-lm" and m["kv_cache"]["num_layers"] == 2
    assert m["kv_cache"]["max_positions"] == 256 and m["generation"]["eos_token_ids"] == [tiny.EOS]
    prompt = list(b"An exported model ")
    want = llama.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=tiny.EOS)[0, len(prompt):].tolist()
    assert kiln.load(tmp_path / "out").generate(prompt, max_new_tokens=16, stop_token_ids=()).token_ids == want


@pytest.mark.slow
def test_an_encoders_hidden_states_are_pooled(tmp_path):
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=tiny.VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128, pad_token_id=tiny.PAD)).eval()
    folder = tmp_path / "exported"
    folder.mkdir()
    ids = torch.ones(2, 8, dtype=torch.int64)
    _export(_Hidden(bert), {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            ["input_ids", "attention_mask"], "last_hidden_state", folder / "model.onnx")
    tiny.byte_tokenizer(bert_style=True).save(str(folder / "tokenizer.json"))
    m = kiln.compile(str(folder / "model.onnx"), tmp_path / "out", progress=False).manifest
    assert m["task"] == "embedding" and m["embedding"]["pooling"] == "mean"
    art = kiln.load(tmp_path / "out")
    texts = ["short", "a longer text than the first"]
    feeds = art.tokenize_batch(texts)
    with torch.no_grad():
        hidden = bert(input_ids=torch.from_numpy(feeds["input_ids"]),
                      attention_mask=torch.from_numpy(feeds["attention_mask"])).last_hidden_state
    mask = torch.from_numpy(feeds["attention_mask"]).unsqueeze(-1).float()
    want = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    np.testing.assert_allclose(art.embed(texts), want, rtol=1e-4, atol=1e-5)


def test_an_onnx_file_with_a_cache_is_refused(tmp_path, prepared):
    import onnx_ir as ir

    from kiln.ir import load_model

    model = load_model(prepared("tiny-llama").path)
    model.graph.inputs.append(ir.Value(name="past_key_values.0.key", type=ir.TensorType(ir.DataType.FLOAT),
                                       shape=ir.Shape(["batch", 2, "past", 16])))
    ir.save(model, tmp_path / "cached.onnx", external_data="cached.onnx.data")
    (tmp_path / "tokenizer.json").write_text(json.dumps(json.loads(tiny.byte_tokenizer(False).to_str())))
    proc = run_kiln("compile", str(tmp_path / "cached.onnx"), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "already takes a KV cache")
    assert_nothing_left(tmp_path, "out")

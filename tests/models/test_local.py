"""Compiling the user's own model by path: Hugging Face and sentence-transformers folders,
GGUF files and transformers objects; a folder is data, and every bad one is one error line."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

import kiln
from conftest import assert_nothing_left, assert_one_line_error, run_kiln
from kiln.models import tiny
from kiln.models.local import ModelFolderError, folder_source, infer_task, max_positions, path_source
from kiln.parity import ParityError

LLAMA = dict(vocab_size=tiny.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
             eos_token_id=tiny.EOS, pad_token_id=tiny.EOS, bos_token_id=None, tie_word_embeddings=True)
BERT = dict(vocab_size=tiny.VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=128, pad_token_id=tiny.PAD)


def save(folder, model, bert_style=False, **kwargs):
    model.save_pretrained(folder, **kwargs)
    tiny.byte_tokenizer(bert_style=bert_style).save(str(folder / "tokenizer.json"))
    return folder


def build(cls, config_cls, **config):
    torch.manual_seed(0)
    return getattr(transformers, cls)(getattr(transformers, config_cls)(**config)).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save(tmp_path_factory.mktemp("llama") / "my-llama", build("LlamaForCausalLM", "LlamaConfig", **LLAMA))


@pytest.mark.slow  # a full compile by path with the parity gate
def test_a_causal_lm_folder_compiles_by_path_and_matches_transformers(llama_dir, tmp_path):
    result = kiln.compile(str(llama_dir), tmp_path / "out", recipe="fp32", progress=False)
    m = result.manifest
    assert m["task"] == "causal-lm"
    assert m["kv_cache"]["max_positions"] == 256  # from the config, not a default
    assert m["generation"]["eos_token_ids"] == [tiny.EOS]
    gate = m["compile"]["parity"]
    assert gate["batch"] == 2 and gate["padding"] > 0 and gate["max_rel"] < 1e-3 and gate["argmax_agreement"] == 1.0
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    prompt = list(b"The kiln fired ")
    want = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=tiny.EOS)[0, len(prompt):].tolist()
    got = kiln.load(tmp_path / "out").generate(prompt, max_new_tokens=24, stop_token_ids=()).token_ids
    assert got == want
    # the manifest names the folder, not where it lived; --check is given the folder again
    assert m["source"]["path"] == "my-llama" and str(llama_dir) not in json.dumps(m)
    run = ("run", str(tmp_path / "out"), "--prompt", "Hi", "-n", "4", "--check", "--json")
    assert_one_line_error(run_kiln(*run), "compiled from 'my-llama' by path", "--source PATH")
    checked = run_kiln(*run, "--source", str(llama_dir))
    assert checked.returncode == 0 and json.loads(checked.stdout)["reference"]["identical"] is True
    other = save(tmp_path / "other", build("LlamaForCausalLM", "LlamaConfig", **{**LLAMA, "initializer_range": 0.3}))
    assert_one_line_error(run_kiln(*run, "--source", str(other)), "is not the model this artifact was compiled from")


@pytest.mark.slow
def test_a_transformers_object_with_its_tokenizer(tmp_path):
    model = build("LlamaForCausalLM", "LlamaConfig", **LLAMA)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny.byte_tokenizer(bert_style=False),
                                               eos_token="<|endoftext|>")
    m = kiln.compile(model, tmp_path / "out", tokenizer=tok, recipe="fp32", progress=False).manifest
    assert m["task"] == "causal-lm" and m["tokenizer"] == "tokenizer.json"
    assert m["compile"]["parity"]["max_rel"] < 1e-3
    assert kiln.load(tmp_path / "out").generate("ab", max_new_tokens=4).token_ids


@pytest.mark.slow
def test_a_sentence_transformers_folder_takes_its_pooling(tmp_path):
    folder = save(tmp_path / "st", build("BertModel", "BertConfig", **BERT), bert_style=True)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                   "pooling_mode_mean_tokens": False}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    m = kiln.compile(str(folder), tmp_path / "out", progress=False).manifest
    assert m["task"] == "embedding"
    assert m["embedding"] == {"pooling": "cls", "normalize": False, "max_sequence_length": 64}
    art = kiln.load(tmp_path / "out")
    feeds = art.tokenize_batch(["a kiln", "a much longer sentence about kilns"])
    model = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state[:, 0].numpy()
    got = art.embed(["a kiln", "a much longer sentence about kilns"])
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99999


@pytest.mark.slow
def test_a_reranker_folder_scores_pairs_as_pytorch_does(tmp_path):
    model = build("BertForSequenceClassification", "BertConfig", num_labels=1,
                  **{**BERT, "initializer_range": 0.2})
    folder = save(tmp_path / "rerank", model, bert_style=True)
    m = kiln.compile(str(folder), tmp_path / "out", progress=False).manifest
    assert m["task"] == "sequence-classification"
    assert m["classification"]["problem_type"] == "regression" and m["classification"]["labels"] == ["LABEL_0"]
    assert [o["name"] for o in m["io"]["outputs"]] == ["logits"]
    art = kiln.load(tmp_path / "out")
    queries = ["what is a kiln", "what is a kiln", "how hot"]
    passages = ["A kiln is an oven for firing pottery.", "The market fell.", "Stoneware fires near 1200 C."]
    feeds = art.tokenize_batch(queries, passages, 128, tiny.PAD)
    assert (feeds["token_type_ids"] == 1).any()  # the pair's second text is typed as such
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits[:, 0].numpy()
    got = np.array([s.logits[0] for s in art.classify(queries, pairs=passages)])
    assert np.abs(got - want).max() < 1e-4
    assert np.ptp(want) > 1e-2  # the pairs score differently: the check compares real signal


def test_task_inference():
    assert infer_task(["GPT2LMHeadModel"], False) == "causal-lm"
    assert infer_task(["BertForSequenceClassification"], False) == "sequence-classification"
    assert infer_task(["BertModel"], False) == "embedding"
    assert infer_task(["BertForMaskedLM"], True) == "embedding"
    assert infer_task(["BertForMaskedLM"], False) is None


def test_roberta_style_positions_hold_padding_idx_plus_one_fewer(tmp_path):
    """XLM-R numbers positions from padding_idx + 1: a table of 40 holds 38 tokens. Calibration
    windows as long as the table's size went past its end (ORT: 'indices element out of data
    bounds'); the declared length is the usable one."""
    config = dict(BERT, max_position_embeddings=40, pad_token_id=1)
    folder = save(tmp_path / "xlmr", build("XLMRobertaModel", "XLMRobertaConfig", **config), bert_style=True)
    result = kiln.compile(str(folder), tmp_path / "out", recipe="int8", progress=False)
    assert result.manifest["embedding"]["max_sequence_length"] == 38
    art = kiln.load(tmp_path / "out")
    assert art.embed(["x" * 36]).shape == (1, 64)  # 36 bytes + [CLS] + [SEP]: the table's last row


def test_max_positions_follow_rope_scaling():
    config = transformers.LlamaConfig(max_position_embeddings=2048,
                                      rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 2048})
    assert max_positions(config) == 8192
    assert max_positions(transformers.GPT2Config(n_positions=256)) == 256


# --- bad folders: one line, nothing written --------------------------------------------

@pytest.fixture
def bad(llama_dir, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(llama_dir, folder)
    return folder


def _compile_fails(folder, tmp_path, *fragments, extra=()):
    """Through the CLI: one error line, a non-zero exit, nothing written."""
    proc = run_kiln("compile", str(folder), "-o", str(tmp_path / "out"), *extra)
    assert_one_line_error(proc, *fragments)
    assert_nothing_left(tmp_path, "out")


def _refused(folder, fragment, **kwargs):
    """The same check without a subprocess: the source refuses before anything is loaded or written."""
    with pytest.raises(ModelFolderError, match=fragment) as err:
        path_source(folder, **kwargs)
    assert "\n" not in str(err.value)


def test_auto_map_is_refused(bad, tmp_path):
    config = json.loads((bad / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "modeling_evil.py").write_text("raise SystemExit('ran code from a model folder')\n")
    _compile_fails(bad, tmp_path, "auto_map", "custom model code")


@pytest.mark.slow
def test_pickle_weights_need_allow_pickle(tmp_path):
    folder = save(tmp_path / "pickled", build("LlamaForCausalLM", "LlamaConfig", **LLAMA))
    weights = folder / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    _refused(folder, "--allow-pickle")
    loaded = folder_source(folder, allow_pickle=True).load()
    assert loaded.meta["weights"].startswith("pickle") and loaded.meta["task"] == "causal-lm"


def test_missing_config(bad, tmp_path):
    (bad / "config.json").unlink()
    _refused(bad, "no config.json")


def test_malformed_config(bad, tmp_path):
    (bad / "config.json").write_text('{"model_type": "llama",')
    _refused(bad, "config.json is not valid JSON")


def test_truncated_safetensors(bad, tmp_path):
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    _compile_fails(bad, tmp_path, "truncated safetensors")


def test_missing_weights(bad, tmp_path):
    (bad / "model.safetensors").unlink()
    _refused(bad, "no weights")


def test_a_shard_index_naming_a_missing_or_outside_file(bad, tmp_path):
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    _refused(bad, "outside the folder")


def test_unknown_task_and_not_a_gguf(bad, tmp_path):
    _refused(bad, "unknown task 'translation'", task="translation")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"NOPE" + bytes(100))
    _refused(fake, "not a GGUF file")


def test_an_unloadable_tokenizer(bad, tmp_path):
    (bad / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(ModelFolderError, match="tokenizer does not load"):
        folder_source(bad).load()


def test_a_wrong_rewrite_is_stopped_by_the_parity_gate():
    """The gate compares with PyTorch's outputs: a graph that differs never becomes an artifact."""
    from kiln.parity import parity_gate

    ids = np.zeros((2, 8), dtype=np.int64)
    mask = np.ones_like(ids)
    reference = {"input_ids": ids, "attention_mask": mask, "output": np.ones((2, 3), dtype=np.float32)}
    graph = _constant_classifier(np.full((2, 3), 1.5, dtype=np.float32))
    with pytest.raises(ParityError, match="differs from the PyTorch model"):
        parity_gate(graph, reference, "sequence-classification", ["some-pass"])
    assert parity_gate(_constant_classifier(np.ones((2, 3), dtype=np.float32)), reference,
                       "sequence-classification", [])["max_rel"] == 0


def _constant_classifier(value):
    import onnx_ir as ir

    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "sequence"]))
    const = ir.node("Constant", [], attributes={"value": ir.tensor(value)}, num_outputs=1)
    out = ir.node("Identity", [const.outputs[0]], num_outputs=1)
    out.outputs[0].name = "logits"
    graph = ir.Graph([ids], [out.outputs[0]], nodes=[const, out], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


@pytest.mark.slow
def test_a_plain_module_declared_a_causal_lm_generates(tmp_path):
    """No transformers class: the user says what it is (task and tokenizer), and kiln caches it."""
    inner = build("LlamaForCausalLM", "LlamaConfig", **LLAMA)

    class MyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False).logits

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny.byte_tokenizer(bert_style=False),
                                               eos_token="<|endoftext|>")
    ids = torch.zeros(2, 8, dtype=torch.int64)
    m = kiln.compile(MyLM().eval(), tmp_path / "out", example_inputs={"input_ids": ids}, task="causal-lm",
                     tokenizer=tok, recipe="fp32", progress=False).manifest
    assert m["task"] == "causal-lm" and m["kv_cache"]["num_layers"] == 2 and m["generation"]["eos_token_ids"] == [tiny.EOS]
    prompt = list(b"kiln ")
    want = inner.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=tiny.EOS)[0, len(prompt):].tolist()
    assert kiln.load(tmp_path / "out").generate(prompt, max_new_tokens=8, stop_token_ids=()).token_ids == want


@pytest.mark.slow
def test_a_sharded_checkpoint(tmp_path):
    folder = tmp_path / "sharded"
    build("LlamaForCausalLM", "LlamaConfig", **LLAMA).save_pretrained(folder, max_shard_size="150KB")
    tiny.byte_tokenizer(bert_style=False).save(str(folder / "tokenizer.json"))
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 1
    m = kiln.compile(str(folder), tmp_path / "out", recipe="fp32", progress=False).manifest
    assert m["compile"]["parity"]["max_rel"] < 1e-3


@pytest.mark.slow
def test_a_mixture_of_experts_folder(tmp_path):
    """Mixtral: the experts exported as batched matmuls, the router Softmax not taken for an attention."""
    model = build("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2,
                  **{k: v for k, v in LLAMA.items() if k != "tie_word_embeddings"})
    folder = save(tmp_path / "moe", model)
    m = kiln.compile(str(folder), tmp_path / "out", recipe="fp32", progress=False).manifest
    assert m["kv_cache"]["num_layers"] == 2 and m["compile"]["parity"]["argmax_agreement"] == 1.0

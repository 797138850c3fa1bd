"""LoRA adapters: `kiln compile --lora` against PEFT's own merge_and_unload, and every refusal.

Tiny random-init models (kiln.models.tiny) saved as Hugging Face folders, adapters made by PEFT
with random A and B (init_lora_weights=False, so B is not zero) and saved as PEFT saves them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import kiln
from kiln.models import tiny
from conftest import assert_one_line_error, run_kiln
from lora_adapters import LLAMA_TARGETS, save_adapter



def _peft():
    return pytest.importorskip("peft")  # at first use: importing peft imports every transformers model

IDS = np.array([[5, 72, 101, 32, 99, 97, 112, 105, 116, 97, 108, 32, 111, 102],
                [84, 104, 101, 32, 109, 111, 111, 110, 32, 105, 115, 32, 97, 32]], dtype=np.int64)


def save_model(name: str, folder):
    model = tiny.build(name)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tiny.byte_tokenizer(bert_style=False).to_str())
    return folder


def peft_logits(model_name: str, adapter, ids: np.ndarray) -> np.ndarray:
    merged = _peft().PeftModel.from_pretrained(tiny.build(model_name), str(adapter)).merge_and_unload().eval()
    with torch.no_grad():
        return merged(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def base_logits(model_name: str, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return tiny.build(model_name)(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def max_rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_model("tiny-llama", tmp_path_factory.mktemp("tiny-llama-hf"))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": save_adapter("tiny-llama", root / "adapter-a", seed=1),
            "b": save_adapter("tiny-llama", root / "adapter-b", seed=2, r=8, lora_alpha=8, use_rslora=True,
                              target_modules=["q_proj", "v_proj", "down_proj"])}


@pytest.mark.parametrize("which", ["a", pytest.param("b", marks=pytest.mark.slow)])  # b: rslora, other targets
def test_merged_adapter_equals_peft_merge_and_unload(llama_folder, adapters, which, tmp_path):
    out = tmp_path / "merged"
    result = kiln.compile(llama_folder, out, recipe="fp32", lora=adapters[which], progress=False)
    got = kiln.load(out)._lm().all_logits(IDS)
    want = peft_logits("tiny-llama", adapters[which], IDS)
    assert max_rel(got, want) <= 1e-4, max_rel(got, want)
    assert max_rel(base_logits("tiny-llama", IDS), want) > 1e-2  # the adapter does change the model
    record = result.manifest["lora"]
    config = json.loads((adapters[which] / "adapter_config.json").read_text())
    assert record["mode"] == "merged"
    (adapter,) = record["adapters"]
    assert adapter["name"] == adapters[which].name and adapter["r"] == config["r"]
    assert adapter["alpha"] == config["lora_alpha"] and adapter["use_rslora"] == config["use_rslora"]
    assert adapter["targets"] == sorted(config["target_modules"])
    assert len(adapter["sha256"]) == 64
    assert "lora" not in result.manifest["source"]
    assert result.manifest["compile"]["parity"]["max_rel"] <= 1e-4  # the gate compared with the merged model


@pytest.mark.slow  # a second model family
def test_merged_conv1d_fan_in_fan_out_gpt2(tmp_path):
    folder = save_model("tiny-gpt2", tmp_path / "gpt2")
    adapter = save_adapter("tiny-gpt2", tmp_path / "gpt2-adapter", seed=3, target_modules=["c_attn", "c_fc"],
                           fan_in_fan_out=True)
    kiln.compile(folder, tmp_path / "out", recipe="fp32", lora=adapter, progress=False)
    got = kiln.load(tmp_path / "out")._lm().all_logits(IDS)
    assert max_rel(got, peft_logits("tiny-gpt2", adapter, IDS)) <= 1e-4


@pytest.mark.slow  # the int4 recipe through the CLI
def test_cli_lora_runs_and_the_int4_recipe_takes_it(llama_folder, adapters, tmp_path):
    out = tmp_path / "cli"
    proc = run_kiln("compile", str(llama_folder), "-o", str(out), "--lora", str(adapters["a"]), "-q")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "kiln.json").read_text())
    assert manifest["lora"]["adapters"][0]["name"] == "adapter-a"
    assert manifest["recipe"]["name"] == "int4"
    proc = run_kiln("run", str(out), "--prompt", "The capital", "-n", "4")
    assert proc.returncode == 0, proc.stderr


# --- refusals: one line each, nothing written ---------------------------------------

def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes, fragment", [
    ({"use_dora": True}, "DoRA (use_dora)"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "trained biases"),
    ({"lora_bias": True}, "lora_bias"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 2}}, "alpha_pattern"),
    ({"init_lora_weights": "pissa"}, "changes the base weights"),
    ({"peft_type": "IA3"}, "IA3 adapter is not supported"),
    ({"r": 0}, "r must be a positive integer"),
    ({"lora_alpha": "x"}, "lora_alpha must be a positive number"),
    ({"future_feature": {"on": 1}}, "future_feature is not supported"),
    ({"r": 8}, "not of rank r=8"),
])
def test_refused_config_features(llama_folder, adapters, tmp_path, changes, fragment):
    adapter = _edit_config(adapters["a"], tmp_path / "edited", **changes)
    proc = run_kiln("compile", str(llama_folder), "-o", str(tmp_path / "out"), "--lora", str(adapter), "-q")
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "out").exists()


def test_refuses_a_pickled_adapter(llama_folder, adapters, tmp_path):
    adapter = tmp_path / "pickled"
    shutil.copytree(adapters["a"], adapter)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    proc = run_kiln("compile", str(llama_folder), "-o", str(tmp_path / "out"), "--lora", str(adapter), "-q")
    assert_one_line_error(proc, "pickle (adapter_model.bin)")


@pytest.mark.parametrize("what", ["no folder", "no config", "no weights", "not json", "truncated"])
def test_refuses_a_broken_adapter_folder(llama_folder, adapters, tmp_path, what):
    adapter = tmp_path / "broken"
    if what != "no folder":
        shutil.copytree(adapters["a"], adapter)
    if what == "no config":
        (adapter / "adapter_config.json").unlink()
    elif what == "no weights":
        (adapter / "adapter_model.safetensors").unlink()
    elif what == "not json":
        (adapter / "adapter_config.json").write_text("{r: 4")
    elif what == "truncated":
        data = (adapter / "adapter_model.safetensors").read_bytes()
        (adapter / "adapter_model.safetensors").write_bytes(data[:-10])
    proc = run_kiln("compile", str(llama_folder), "-o", str(tmp_path / "out"), "--lora", str(adapter), "-q")
    assert_one_line_error(proc, {"no folder": "no such LoRA adapter folder", "no config": "no adapter_config.json",
                                 "no weights": "no adapter_model.safetensors", "not json": "not valid JSON",
                                 "truncated": "truncated"}[what])


def test_refuses_an_adapter_for_another_model(llama_folder, tmp_path):
    adapter = save_adapter("tiny-qwen2", tmp_path / "qwen-adapter", seed=4, target_modules=["gate_proj"])
    proc = run_kiln("compile", str(llama_folder), "-o", str(tmp_path / "out"), "--lora", str(adapter), "-q")
    assert_one_line_error(proc, "does not fit the model", "gate_proj is 64 -> 128")


def test_refuses_a_module_the_model_lacks(llama_folder, tmp_path):
    adapter = save_adapter("tiny-gpt2", tmp_path / "gpt2-adapter", seed=5, target_modules=["c_attn"],
                           fan_in_fan_out=True)
    proc = run_kiln("compile", str(llama_folder), "-o", str(tmp_path / "out"), "--lora", str(adapter), "-q")
    assert_one_line_error(proc, "which the model does not have")


def test_refuses_lora_on_embeddings(llama_folder, tmp_path):
    adapter = save_adapter("tiny-llama", tmp_path / "emb-adapter", seed=6, target_modules=["embed_tokens"])
    proc = run_kiln("compile", str(llama_folder), "-o", str(tmp_path / "out"), "--lora", str(adapter), "-q")
    assert_one_line_error(proc, "LoRA on embeddings")


def test_refuses_a_stray_tensor(llama_folder, adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "stray"
    shutil.copytree(adapters["a"], adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.modules_to_save.weight"] = torch.zeros(4, 4)
    save_file(tensors, adapter / "adapter_model.safetensors")
    proc = run_kiln("compile", str(llama_folder), "-o", str(tmp_path / "out"), "--lora", str(adapter), "-q")
    assert_one_line_error(proc, "modules_to_save")


def test_refuses_lora_on_an_onnx_file(adapters, tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")
    proc = run_kiln("compile", str(onnx), "-o", str(tmp_path / "out"), "--lora", str(adapters["a"]), "-q")
    assert_one_line_error(proc, "--lora needs a model folder")


# --- slots: several adapters served from one artifact -------------------------------

def greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def peft_model(adapter):
    return _peft().PeftModel.from_pretrained(tiny.build("tiny-llama"), str(adapter)).merge_and_unload().eval()


@pytest.fixture(scope="module")
def slots_artifact(llama_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("slots") / "art"
    kiln.compile(llama_folder, out, recipe="fp32", lora_slots=2, lora_rank=8, progress=False)
    return out


@pytest.mark.slow  # the slots artifact: a compile with a probe adapter and the parity gate
def test_slots_manifest_and_graph(slots_artifact):
    manifest = json.loads((slots_artifact / "kiln.json").read_text())
    record = manifest["lora"]
    assert record["mode"] == "slots" and record["slots"] == 2 and record["rank"] == 8
    assert record["index_input"] == "adapter_index" and record["dtype"] == "float"
    assert {m["name"].rsplit(".", 1)[-1] for m in record["modules"]} == set(LLAMA_TARGETS)
    assert manifest["io"]["inputs"][-1] == {"name": "adapter_index", "dtype": "int64", "shape": ["batch"]}
    assert "kv_cache" in manifest  # the KV cache pass and the attention fusion still apply
    assert manifest["summary"]["artifact"]["ops"].get("com.microsoft::GroupQueryAttention") == 2


@pytest.mark.slow  # the slots artifact: a compile with a probe adapter and the parity gate
def test_two_adapters_from_one_artifact_give_each_adapters_tokens(slots_artifact, adapters):
    art = kiln.load(slots_artifact, lora={"a": adapters["a"], "b": adapters["b"]})
    assert art.adapters == {"a": 1, "b": 2}
    prompt = IDS[0].tolist()
    want = {"a": greedy(peft_model(adapters["a"]), prompt, 12), "b": greedy(peft_model(adapters["b"]), prompt, 12),
            None: greedy(tiny.build("tiny-llama"), prompt, 12)}
    assert len({tuple(v) for v in want.values()}) == 3  # the adapters do change the tokens
    for name, tokens in want.items():
        assert art.generate(prompt, max_new_tokens=12, adapter=name).token_ids == tokens, name
    # logits: each slot against PEFT's merged model, rank 4 zero-padded to the compiled 8, rslora
    model = art._lm()
    for name, slot in (("a", 1), ("b", 2)):
        got = model.all_logits(IDS, [slot, slot])
        assert max_rel(got, peft_logits("tiny-llama", adapters[name], IDS)) <= 1e-4
    # mixed adapters in one batch: static and continuous batching
    prompts = [prompt, IDS[1].tolist(), prompt]
    names = ["a", "b", None]
    expect = [greedy(peft_model(adapters[n]) if n else tiny.build("tiny-llama"), p, 8) for p, n in zip(prompts, names)]
    assert [g.token_ids for g in art.generate_batch(prompts, max_new_tokens=8, adapters=names)] == expect
    got = art.generate_continuous(prompts, max_new_tokens=8, arrivals=[0, 2, 3], adapters=names)
    assert [g.token_ids for g in got] == expect


@pytest.mark.slow  # the slots artifact: a compile with a probe adapter and the parity gate
def test_kiln_run_with_adapters(slots_artifact, adapters):
    proc = run_kiln("run", str(slots_artifact), "--lora", f"a={adapters['a']}", "--lora", f"b={adapters['b']}",
                    "--adapter", "b", "--prompt", "The capital", "-n", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    ids = kiln.load(slots_artifact).encode("The capital")
    assert json.loads(proc.stdout)["token_ids"] == greedy(peft_model(adapters["b"]), ids, 6)


@pytest.mark.slow  # several compiles
def test_slot_refusals(slots_artifact, adapters, llama_folder, tmp_path):
    big = save_adapter("tiny-llama", tmp_path / "big", seed=7, r=16)
    proc = run_kiln("run", str(slots_artifact), "--lora", f"big={big}", "--adapter", "big", "--prompt", "x", "-n", "1")
    assert_one_line_error(proc, "rank 16 is above the artifact's LoRA rank 8")
    proc = run_kiln("run", str(slots_artifact), "--lora", f"a={adapters['a']}", "--adapter", "c", "--prompt", "x")
    assert_one_line_error(proc, "no LoRA adapter named 'c'")
    proc = run_kiln("run", str(slots_artifact), "--lora", f"a={adapters['a']}", "--lora", f"b={adapters['b']}",
                    "--lora", f"c={adapters['a']}", "--prompt", "x")
    assert_one_line_error(proc, "3 adapters for 2 LoRA slots")
    proc = run_kiln("run", str(slots_artifact), "--lora", f"{adapters['a']}", "--prompt", "x")
    assert proc.returncode != 0 and "NAME=ADAPTER_DIR" in proc.stderr
    partial = tmp_path / "partial"
    kiln.compile(llama_folder, partial, recipe="fp32", lora_slots=1, lora_rank=4, lora_targets=["q_proj"],
                 progress=False)
    proc = run_kiln("run", str(partial), "--lora", f"a={adapters['a']}", "--prompt", "x")
    assert_one_line_error(proc, "which the artifact's LoRA slots do not cover", "compiled for q_proj")
    merged = tmp_path / "merged"
    kiln.compile(llama_folder, merged, recipe="fp32", lora=adapters["a"], progress=False)
    proc = run_kiln("run", str(merged), "--lora", f"a={adapters['a']}", "--prompt", "x")
    assert_one_line_error(proc, "has no LoRA slots", "adapter-a merged in")


@pytest.mark.parametrize("args, fragment", [
    (["--lora-slots", "2", "--lora", "ADAPTER"], "give one"),
    (["--lora-slots", "0"], "--lora-slots must be between 1 and 64"),
    (["--lora-slots", "2", "--lora-targets", "qq_proj"], "no linear layer named qq_proj"),
    (["--lora-slots", "2", "--task", "embedding"], "serves causal LMs"),
])
def test_slots_compile_refusals(llama_folder, adapters, tmp_path, args, fragment):
    args = [str(adapters["a"]) if a == "ADAPTER" else a for a in args]
    proc = run_kiln("compile", str(llama_folder), "-o", str(tmp_path / "out"), "-q", *args)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "out").exists()

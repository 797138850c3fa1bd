"""`kiln serve --lora`: PEFT adapters in a `--lora-slots` artifact served as models of their own
(`MODEL:NAME`), against the real openai client. Greedy completions for two adapters and the base,
sent concurrently, equal each adapter's own `kiln.load(dir, lora=...)`; rows of different
adapters share one decode step; per-adapter token counters; every start-up refusal is one
`error:` line before the server listens.

Tiny random-init Llama saved as a Hugging Face folder, adapters made by PEFT with random A and B
(as in tests/kiln/test_lora.py)."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from conftest import assert_one_line_error, run_kiln
from lora_adapters import save_adapter
from serve_helpers import InProcess, Live

import kiln

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]  # live servers over compiled slots artifacts

PROMPTS = ["Hello, world", "The quick brown fox jumps over"]
N = 24


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict:
    """A 2-slot rank-8 artifact, a plain one, adapters a (rank 4) and b (rank 8, rslora), c."""
    from kiln.models import tiny

    root = tmp_path_factory.mktemp("lora-serve")
    folder = root / "tiny-llama-hf"
    tiny.build("tiny-llama").save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tiny.byte_tokenizer(bert_style=False).to_str())
    slots = kiln.compile(folder, root / "slots", recipe="fp32", lora_slots=2, lora_rank=8, progress=False).path
    plain = kiln.compile(folder, root / "plain", recipe="fp32", progress=False).path
    return {"slots": slots, "plain": plain,
            "a": save_adapter("tiny-llama", root / "adapter-a", seed=1),
            "b": save_adapter("tiny-llama", root / "adapter-b", seed=2, r=8, lora_alpha=8, use_rslora=True,
                              target_modules=["q_proj", "v_proj", "down_proj"]),
            "c": save_adapter("tiny-llama", root / "adapter-c", seed=3)}


@pytest.fixture(scope="module")
def want(lora) -> dict:
    """Each model id's greedy tokens per prompt, from the runtime with only that adapter loaded."""
    out = {"base": [kiln.load(lora["slots"], threads=1).generate(p, N).token_ids for p in PROMPTS]}
    for name in ("a", "b"):
        art = kiln.load(lora["slots"], threads=1, lora={name: lora[name]})
        out[f"base:{name}"] = [art.generate(p, N, adapter=name).token_ids for p in PROMPTS]
    return out


@pytest.fixture(scope="module")
def live(lora):
    server = Live([f"base={lora['slots']}"], "--lora", f"a={lora['a']}", "--lora", f"b={lora['b']}",
                  "--threads", "1", "--no-verify", "--max-batch", "8")
    yield server
    server.stop()


def test_adapters_are_listed_as_models(live):
    cards = {m.id: m for m in live.client().models.list()}
    assert set(cards) == {"base", "base:a", "base:b"}
    assert cards["base:a"].model_extra["parent"] == "base" and cards["base:a"].model_extra["adapter"] == "a"
    assert "parent" not in cards["base"].model_extra
    assert set(httpx.get(live.url + "/health").json()["models"]) == set(cards)


def test_concurrent_greedy_completions_per_adapter_equal_their_own_runtime(live, want):
    assert len({tuple(v[0]) for v in want.values()}) == 3  # the adapters do change the tokens
    client = live.client()
    results, errors = {}, []
    barrier = threading.Barrier(2 * len(want) * len(PROMPTS))

    def one(model, i, stream):
        try:
            barrier.wait(30)
            if stream:
                ids, text = [], ""
                for chunk in client.completions.create(model=model, prompt=PROMPTS[i], max_tokens=N, temperature=0,
                                                       stream=True, extra_body={"return_token_ids": True}):
                    ids += chunk.choices[0].model_extra.get("token_ids") or []
                    text += chunk.choices[0].text
                    assert chunk.model == model
            else:
                got = client.completions.create(model=model, prompt=PROMPTS[i], max_tokens=N, temperature=0,
                                                extra_body={"return_token_ids": True})
                assert got.model == model
                ids = got.choices[0].model_extra["token_ids"]
            results[(model, i, stream)] = ids
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(m, i, s)) for m in want for i in range(len(PROMPTS))
               for s in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == len(threads)
    for (model, i, _), ids in results.items():
        assert ids == want[model][i], (model, i)


def test_chat_style_text_and_a_lone_request_per_adapter(live, want, lora):
    art = kiln.load(lora["slots"], threads=1, lora={"b": lora["b"]})
    got = live.client().completions.create(model="base:b", prompt=PROMPTS[1], max_tokens=N, temperature=0)
    assert got.choices[0].text == art.generate(PROMPTS[1], N, adapter="b").text
    assert got.usage.completion_tokens == len(want["base:b"][1])


def test_generated_tokens_are_counted_per_adapter(live):
    before = {m: live.metric("kiln_generated_tokens_total", model=m) for m in ("base", "base:a", "base:b")}
    for model, n in (("base:a", 5), ("base:b", 7), ("base", 3)):
        r = live.post("/v1/completions", {"model": model, "prompt": "x y", "max_tokens": n, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == n
    after = {m: live.metric("kiln_generated_tokens_total", model=m) for m in before}
    assert {m: after[m] - before[m] for m in before} == {"base:a": 5, "base:b": 7, "base": 3}


def test_unknown_adapters_are_400_model_not_found(live):
    client = live.client()
    for model in ("base:c", "a", "base:"):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=model, prompt="x", max_tokens=2)
        assert info.value.code == "model_not_found" and info.value.body["param"] == "model"
    r = live.post("/v1/embeddings", {"model": "base:a", "input": "x"})  # an adapter is an LLM, not an embedder
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_found"


def test_rows_of_different_adapters_share_one_decode_step(lora, want):
    """In-process, steps slowed, so the three requests overlap: some decode step holds rows of
    slots 0, 1 and 2 together, and each still gets its own tokens."""
    from kiln.serve.models import load_all

    served = load_all([f"base={lora['slots']}"], threads=1, verify=False,
                      lora=[f"a={lora['a']}", f"b={lora['b']}"])
    assert {n: (s.adapter, s.slot) for n, s in served.items()} == {"base": (None, 0), "base:a": ("a", 1),
                                                                  "base:b": ("b", 2)}
    server = InProcess(served, max_batch=8)
    try:
        loop = server.loop("base")
        assert served["base:a"].loop is loop and served["base:b"].loop is loop  # one batch for all three
        seen: list[tuple[int, ...]] = []
        real = loop.gen.step

        def step():
            time.sleep(0.01)
            seen.append(tuple(sorted(r.adapter for r in loop.gen.rows)))
            return real()

        loop.gen.step = step
        results = {}

        def one(model):
            r = httpx.post(server.url + "/v1/completions", timeout=60, json={
                "model": model, "prompt": PROMPTS[0], "max_tokens": N, "temperature": 0, "return_token_ids": True})
            results[model] = r.json()["choices"][0]["token_ids"]

        threads = [threading.Thread(target=one, args=(m,)) for m in ("base", "base:a", "base:b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == {m: want[m][0] for m in ("base", "base:a", "base:b")}
        assert (0, 1, 2) in seen
    finally:
        server.close()


@pytest.fixture
def no_listen(monkeypatch):
    """`kiln serve` in this process; reaching uvicorn's run (listening) fails the test."""
    import uvicorn

    def run(self, *args, **kwargs):
        raise AssertionError("kiln serve got as far as listening")

    monkeypatch.setattr(uvicorn.Server, "run", run)


def _serve(*args):
    return run_kiln("serve", *args, "--no-verify", "--threads", "1", "--port", "0")


def test_start_up_refusals(lora, no_listen, tmp_path):
    slots, plain, a, b, c = (str(lora[k]) for k in ("slots", "plain", "a", "b", "c"))
    assert_one_line_error(_serve(slots, "--lora", f"a={a}", "--lora", f"b={b}", "--lora", f"c={c}"),
                          "3 adapters for 2 LoRA slots")
    assert_one_line_error(_serve(plain, "--lora", f"a={a}"), "has no LoRA slots")
    assert_one_line_error(_serve(slots, "--lora", f"a={tmp_path / 'missing'}"), "no such LoRA adapter folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(_serve(slots, "--lora", f"a={empty}"), "no adapter_config.json")
    big = save_adapter("tiny-llama", tmp_path / "big", seed=4, r=16)
    assert_one_line_error(_serve(slots, "--lora", f"a={big}"), "rank 16 is above the artifact's LoRA rank 8")
    # which artifact: NAME=DIR needs one served artifact; MODEL:NAME=DIR names it among several
    assert_one_line_error(_serve(f"x={slots}", f"y={plain}", "--lora", f"a={a}"), "2 models are served",
                          "MODEL:a=ADAPTER_DIR")
    assert_one_line_error(_serve(f"x={slots}", f"y={plain}", "--lora", f"z:a={a}"), "no served model is named 'z'")
    assert_one_line_error(_serve(f"x={slots}", f"y={plain}", "--lora", f"y:a={a}"), "has no LoRA slots")
    assert_one_line_error(_serve(slots, "--lora", a), "is not [MODEL:]NAME=ADAPTER_DIR")
    assert_one_line_error(_serve(slots, "--lora", f"a={a}", "--lora", f"a={b}"), "'a' is given twice")
    assert_one_line_error(_serve(slots, "--lora", f"a/b={a}"), "'a/b' cannot be an adapter name")
    assert_one_line_error(_serve(f"m={slots}", f"m:a={plain}", "--lora", f"m:a={a}"),
                          "would be served as 'm:a'")


def test_several_artifacts_with_prefixed_adapters(lora, want):
    """MODEL:NAME=DIR with two artifacts served: the adapter lands in the named one only."""
    from kiln.serve.models import load_all

    served = load_all([f"x={lora['slots']}", f"y={lora['plain']}"], threads=1, verify=False,
                      lora=[f"x:b={lora['b']}"])
    assert list(served) == ["x", "x:b", "y"]
    assert served["x:b"].base is served["x"] and served["x:b"].slot == 1
    assert served["x"].art.generate(PROMPTS[0], N, adapter="b").token_ids == want["base:b"][0]


def test_help_mentions_lora():
    proc = run_kiln("serve", "--help")
    assert proc.returncode == 0
    assert "--lora" in proc.stdout and "[MODEL:]NAME=ADAPTE" in proc.stdout and "LoRA" in proc.stdout

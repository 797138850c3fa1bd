"""`kiln serve` against the real openai client: greedy tokens as `kiln run` / art.generate,
embeddings as art.embed, and the 400 / 401 / 413 / 429 / SIGTERM paths."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from conftest import run_kiln
from serve_helpers import Live
from serve_helpers import artifacts, live  # noqa: F401 (fixtures)

import kiln

PROMPTS = ["Hello, world", "The quick brown fox jumps over", "a b c d e f g"]


def test_greedy_completions_equal_kiln_run(live, artifacts):
    client = live.client()
    art = kiln.load(artifacts["tl"])
    for prompt in PROMPTS:
        want = art.generate(prompt, 24)
        got = client.completions.create(model="tl", prompt=prompt, max_tokens=24, temperature=0,
                                        extra_body={"return_token_ids": True})
        assert got.choices[0].model_extra["token_ids"] == want.token_ids
        assert got.choices[0].text == want.text
        assert got.choices[0].finish_reason == want.stop_reason
        assert got.usage.prompt_tokens == len(want.prompt_ids) and got.usage.completion_tokens == len(want.token_ids)
        streamed, ids = "", []
        for chunk in client.completions.create(model="tl", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                               extra_body={"return_token_ids": True}):
            streamed += chunk.choices[0].text
            ids += chunk.choices[0].model_extra.get("token_ids") or []
        assert ids == want.token_ids and streamed == want.text
    # ... and `kiln run` in its own process
    run = run_kiln("run", str(artifacts["tl"]), "--prompt", PROMPTS[1], "-n", "24", "--json")
    assert run.returncode == 0, run.stderr
    got = client.completions.create(model="tl", prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert got.choices[0].model_extra["token_ids"] == json.loads(run.stdout)["token_ids"]


def test_ignore_eos_generates_max_tokens_past_the_end_of_sequence(live, artifacts):
    want = kiln.load(artifacts["tl"]).generate("Hello, world", 40).token_ids  # the same weights, no eos met
    body = {"model": "eos", "prompt": "Hello, world", "max_tokens": 40, "temperature": 0, "return_token_ids": True}
    plain = live.post("/v1/completions", body).json()["choices"][0]
    assert plain["token_ids"] == want[:5] and plain["finish_reason"] == "stop"
    got = live.post("/v1/completions", {**body, "ignore_eos": True}).json()["choices"][0]
    assert got["token_ids"] == want and got["finish_reason"] == "length"


def test_concurrent_greedy_requests_each_equal_their_solo_run(live, artifacts):
    art = kiln.load(artifacts["tl"])
    want = {p: art.generate(p, 32).token_ids for p in PROMPTS}
    results = {}

    def one(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        r = live.post("/v1/completions", {"model": "tl", "prompt": prompt, "max_tokens": 32, "temperature": 0,
                                          "return_token_ids": True})
        results[i] = (prompt, r.json()["choices"][0]["token_ids"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 9 and all(ids == want[p] for p, ids in results.values())


def test_chat_completion_uses_the_manifest_template(live, artifacts):
    art = kiln.load(artifacts["chat"])
    want = art.generate(art.chat_prompt("Hi there"), 12)
    client = live.client()
    got = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi there"}],
                                         max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Hi there"}], max_tokens=12, temperature=0, stream=True)
        if c.choices]
    assert "".join(parts) == want.text
    # no template: 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tl", messages=[{"role": "user", "content": "x"}], max_tokens=2)


def test_stop_strings_and_usage_chunk(live, artifacts):
    client = live.client()
    full = client.completions.create(model="tl", prompt=PROMPTS[0], max_tokens=24, temperature=0).choices[0].text
    stop = full[5:7]
    cut = full[:full.find(stop)]
    got = client.completions.create(model="tl", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tl", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stop,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut
    assert chunks[-1].usage.prompt_tokens > 0


def test_sampling_with_a_seed_is_repeatable(live):
    body = {"model": "tl", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0.9, "top_p": 0.9, "seed": 7,
            "return_token_ids": True}
    a, b = (live.post("/v1/completions", body).json()["choices"][0]["token_ids"] for _ in range(2))
    assert a == b


def test_embeddings_equal_art_embed(live, artifacts):
    art = kiln.load(artifacts["tb"])
    texts = ["hello world", "a somewhat longer sentence about compilers"]
    want = art.embed(texts)
    client = live.client()
    got = client.embeddings.create(model="tb", input=texts)  # the client asks for base64
    assert np.array_equal(np.array([d.embedding for d in got.data], dtype=np.float32), want)
    plain = client.embeddings.create(model="tb", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(plain.data[0].embedding, want[0], rtol=1e-6)
    assert got.usage.prompt_tokens == int(art.tokenize_batch(texts)["attention_mask"].sum())


def test_models_health_and_metrics(live):
    assert httpx.get(live.url + "/health").json()["status"] == "ok"  # no key needed
    ids = {m.id for m in live.client().models.list()}
    assert ids == {"tl", "chat", "tb", "eos"}
    text = httpx.get(live.url + "/metrics", headers=live.headers).text
    for name in ("kiln_queue_depth", "kiln_running_rows", "kiln_generated_tokens_total",
                 "kiln_time_to_first_token_seconds_bucket", "kiln_inter_token_seconds_bucket", "kiln_rejections_total"):
        assert name in text


def _error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param:
        assert error["param"] == param
    if code:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("body,param", [
    ({"model": "tl", "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": "tl", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "tl", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"model": "tl", "prompt": "x", "top_p": 1.5}, "top_p"),
    ({"model": "tl", "prompt": "x", "stop": [1, 2]}, "stop"),
    ({"model": "tl", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "tl", "prompt": "x", "ignore_eos": 1}, "ignore_eos"),
    ({"model": "tl", "prompt": "x", "n": 3}, "n"),
    ({"model": "tl", "prompt": ""}, "prompt"),
    ({"model": "tl"}, "prompt"),
    ({"model": "tl", "prompt": [1, 10 ** 9]}, "prompt"),
    ({"model": "nope", "prompt": "x"}, "model"),
    ({"model": "tb", "prompt": "x"}, "model"),
])
def test_invalid_parameters_are_400(live, body, param):
    _error(live.post("/v1/completions", body), 400, param)


def test_invalid_json_and_long_prompts_are_400(live):
    r = httpx.post(live.url + "/v1/completions", content=b"{not json", headers=live.headers)
    _error(r, 400, code="invalid_json")
    _error(live.post("/v1/completions", [1, 2]), 400, code="invalid_json")
    _error(live.post("/v1/completions", {"model": "tl", "prompt": [5] * 600}), 400, "prompt",
           "context_length_exceeded")
    _error(live.post("/v1/embeddings", {"model": "tb", "input": 42}), 400, "input")
    with pytest.raises(openai.BadRequestError) as info:
        live.client().completions.create(model="tl", prompt=" ".join(["word"] * 600), max_tokens=4)
    assert info.value.code == "context_length_exceeded"


def test_api_key_is_required(live):
    r = httpx.post(live.url + "/v1/completions", json={"model": "tl", "prompt": "x"})
    assert _error(r, 401)["type"] == "authentication_error"
    r = httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    _error(r, 401)
    with pytest.raises(openai.AuthenticationError):
        import openai as o

        o.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_bodies_over_the_limit_are_413(live):
    r = live.post("/v1/completions", {"model": "tl", "prompt": "x" * 70000})
    _error(r, 413, code="body_too_large")

    def chunked():  # no Content-Length: counted while read
        for _ in range(20):
            yield b" " * 8192

    r = httpx.post(live.url + "/v1/completions", content=chunked(), headers=live.headers)
    _error(r, 413, code="body_too_large")


def test_a_full_queue_is_429_with_retry_after(artifacts):
    server = Live([f"tl={artifacts['tl']}"], "--max-queue", "0", "--no-verify")
    try:
        r = server.post("/v1/completions", {"model": "tl", "prompt": "x", "max_tokens": 2})
        _error(r, 429, code="queue_full")
        assert r.headers["Retry-After"] == "1"
        assert server.metric("kiln_rejections_total", model="tl", reason="queue_full") == 1
        with pytest.raises(openai.RateLimitError):
            server.client().completions.create(model="tl", prompt="x", max_tokens=2)
    finally:
        server.stop()


def test_sigterm_finishes_in_flight_streams_and_exits_0(artifacts):
    server = Live([f"tl={artifacts['tl']}"], "--no-verify")
    events = []

    def stream():
        with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=60,
                          json={"model": "tl", "prompt": "Hello", "max_tokens": 400, "temperature": 0,
                                "stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 30
    while not events and time.monotonic() < deadline:
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    t.join(30)
    assert events[-1] == "data: [DONE]"  # the stream ended properly
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "/health", timeout=2)

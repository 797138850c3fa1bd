"""The decode loop: admission by priority with aging, disconnects free their rows, a failing row
fails only its request (500), deadlines (504), chunked prefill equal to whole prefill."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

import kiln
from kiln.runtime import generate as gen_module
from kiln.runtime.generate import Generator, SamplingParams
from kiln.serve.scheduler import Job, pick
from serve_helpers import artifacts, in_process  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(120)


def slow_steps(monkeypatch, seconds: float) -> None:
    real = Generator.step

    def step(self):
        time.sleep(seconds)
        return real(self)

    monkeypatch.setattr(Generator, "step", step)


def completion(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": "tl", "temperature": 0, **body}, timeout=60)


def test_pick_by_priority_then_age():
    def job(priority, arrived, seq):
        return Job([1], SamplingParams(), lambda e: None, priority=priority, arrived=arrived, seq=seq)

    low, high, high_twin = job(0, 100.0, 0), job(10, 101.0, 1), job(10, 101.0, 2)
    assert pick([low, high_twin, high], now=102.0, aging=5.0) is high  # priority first, then arrival
    # a priority-10 job arriving 60 s after `low`: 0 + 60/5 = 12 > 10 + 0
    late = job(10, 160.0, 3)
    assert pick([low, late], now=160.0, aging=5.0) is low
    assert pick([low, job(10, 140.0, 4)], now=160.0, aging=5.0).priority == 10  # only 40 s: 8 < 10
    assert pick([low, late], now=160.0, aging=0.0) is late  # aging off


def test_higher_priority_is_admitted_first_and_aging_admits_the_old(in_process, monkeypatch):
    slow_steps(monkeypatch, 0.01)
    server = in_process(max_batch=1, aging=1000.0)
    done: list[str] = []

    def run(name, **body):
        completion(server.url, **body)
        done.append(name)

    blocker = threading.Thread(target=run, args=("blocker",), kwargs={"prompt": "Hello", "max_tokens": 100})
    blocker.start()
    wait_for(lambda: server.loop("tl").running)
    threads = []
    for name, priority in (("low", 0), ("mid", 5), ("high", 10)):
        threads.append(threading.Thread(target=run, args=(name,), kwargs={"prompt": "Hi", "max_tokens": 3,
                                                                           "priority": priority}))
        threads[-1].start()
        wait_for(lambda: len(server.loop("tl").pending) == len(threads))
    for t in [blocker, *threads]:
        t.join(60)
    assert done == ["blocker", "high", "mid", "low"]
    # with fast aging the low request, queued 0.3 s before, overtakes a priority-1 arrival
    server.loop("tl").aging = 0.01
    done.clear()
    blocker = threading.Thread(target=run, args=("blocker",), kwargs={"prompt": "Hello", "max_tokens": 60})
    blocker.start()
    wait_for(lambda: server.loop("tl").running)
    old = threading.Thread(target=run, args=("old-low",), kwargs={"prompt": "Hi", "max_tokens": 3, "priority": 0})
    old.start()
    time.sleep(0.3)
    new = threading.Thread(target=run, args=("new-high",), kwargs={"prompt": "Hi", "max_tokens": 3, "priority": 1})
    new.start()
    for t in (blocker, old, new):
        t.join(60)
    assert done == ["blocker", "old-low", "new-high"]


def wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_disconnected_client_frees_its_row(in_process, monkeypatch):
    slow_steps(monkeypatch, 0.02)
    server = in_process()
    loop = server.loop("tl")
    for stream in (True, False):
        body = json.dumps({"model": "tl", "prompt": "Hello", "max_tokens": 400, "temperature": 0, "stream": stream})
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        wait_for(lambda: loop.running and next(iter(loop.running.values())).generated > 2)
        sock.close()  # the client goes away mid-generation
        wait_for(lambda: not loop.running)
        assert not loop.gen.rows and loop.gen.cache is None  # row and cache freed
    metrics = httpx.get(server.url + "/metrics").text
    assert 'kiln_cancelled_rows_total{model="tl",reason="disconnect"} 2' in metrics
    assert 'kiln_running_rows{model="tl"} 0' in metrics


def test_a_failing_row_fails_its_request_only(in_process, monkeypatch, artifacts):
    slow_steps(monkeypatch, 0.005)
    real = gen_module.choose

    def choose(logits, params, rng):
        if params.seed == 13 and params.temperature > 0:
            raise FloatingPointError("injected")
        return real(logits, params, rng)

    monkeypatch.setattr(gen_module, "choose", choose)
    server = in_process()
    results = {}

    def run(name, **body):
        results[name] = completion(server.url, **body)

    good = threading.Thread(target=run, args=("good",), kwargs={"prompt": "Hello", "max_tokens": 30,
                                                                 "return_token_ids": True})
    good.start()
    run("bad", prompt="Hello", max_tokens=30, temperature=0.5, seed=13)
    good.join(60)
    assert results["bad"].status_code == 500 and results["bad"].json()["error"]["type"] == "server_error"
    want = kiln.load(artifacts["tl"]).generate("Hello", 30).token_ids
    assert results["good"].status_code == 200 and results["good"].json()["choices"][0]["token_ids"] == want
    assert completion(server.url, prompt="Hello", max_tokens=2).status_code == 200  # the server goes on


def test_a_failing_batch_step_fails_its_rows_and_the_server_goes_on(in_process, monkeypatch):
    real = Generator._decode
    calls = {"n": 0}

    def decode(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return real(self)

    monkeypatch.setattr(Generator, "_decode", decode)
    server = in_process()
    r = completion(server.url, prompt="Hello", max_tokens=10)
    assert r.status_code == 500
    assert completion(server.url, prompt="Hello", max_tokens=10).status_code == 200


def test_a_request_past_its_deadline_is_504(in_process, monkeypatch):
    slow_steps(monkeypatch, 0.02)
    server = in_process(timeout=0.3)
    r = completion(server.url, prompt="Hello", max_tokens=400)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert not server.loop("tl").running


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_prefill_gives_the_same_tokens(artifacts, chunk):
    art = kiln.load(artifacts["tl"])
    prompts = ["Hello, world " * 12, "The quick brown fox", "a b c d e f g h i j k"]
    want = [art.generate(p, 10).token_ids for p in prompts]
    g = Generator(art._lm(), prefill_chunk=chunk)
    ids = {g.submit(art.encode(p), SamplingParams(max_new_tokens=10)): i for i, p in enumerate(prompts)}
    out = [[] for _ in prompts]
    steps = 0
    while g.busy:
        for rid, token in g.step():
            out[ids[rid]].append(token)
        steps += 1
    assert out == want and not g.failed
    if chunk == 1:  # one prompt token per step: the long prompt joins after len(prompt) steps
        assert steps > len(art.encode(prompts[0]))


def test_prefill_of_a_long_prompt_does_not_stall_running_rows_beyond_a_chunk(artifacts):
    """With prefill_chunk=16, no decode step of a running row waits for more than one chunk's
    prefill, while a whole-prompt prefill of 480 tokens takes one long step."""
    art = kiln.load(artifacts["tl"], threads=1)
    long_prompt = ([5, 6, 7, 8] * 120)[:480]

    def worst_step(chunk):
        g = Generator(art._lm(), prefill_chunk=chunk)
        g.submit([1, 2, 3], SamplingParams(max_new_tokens=60))
        for _ in range(3):
            g.step()
        g.submit(long_prompt, SamplingParams(max_new_tokens=2))
        worst = 0.0
        while len(g.rows) + len(g.waiting) > 1 or g.waiting:
            start = time.perf_counter()
            g.step()
            worst = max(worst, time.perf_counter() - start)
        return worst

    whole, chunked = min(worst_step(None) for _ in range(3)), min(worst_step(16) for _ in range(3))
    assert chunked < 0.75 * whole, (chunked, whole)

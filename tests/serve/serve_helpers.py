"""Helpers and fixtures for the serve tests (imported by the test modules: a conftest.py here
would shadow tests/conftest.py's `from conftest import ...` when the whole suite runs).

`kiln serve` in a subprocess on a free local port over tiny-llama (fp32; a copy with a chat
template, `chat`) and tiny-bert, and the app in-process (uvicorn in a thread) for tests that slow
or break decode steps."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import kiln

API_KEY = "test-key"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """`kiln serve` in a subprocess."""

    def __init__(self, specs: list[str], *options: str, api_key: str | None = API_KEY):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "kiln.cli", "serve", *specs, "--port", str(self.port), *options]
        env = {**os.environ, "KILN_API_KEY": api_key} if api_key else {k: v for k, v in os.environ.items()
                                                                            if k != "KILN_API_KEY"}
        self.api_key = api_key
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("kiln serve did not come up")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, body=None, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers={**self.headers, **kw.pop("headers", {})},
                          timeout=60, **kw)

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(name + " ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class InProcess:
    """The app in this process (uvicorn in a thread), so a test can slow or break decode steps."""

    def __init__(self, served: dict, **settings):
        import uvicorn

        from kiln.serve.app import Settings, create_app

        self.settings = Settings(**settings)
        self.asgi, self.app = create_app(served, self.settings)
        self.served = served
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.asgi, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)

    def loop(self, name: str):
        return self.served[name].loop

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)



@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, compiled) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    tl, tb = compiled("tiny-llama", "fp32"), compiled("tiny-bert")
    chat = root / "chat"
    shutil.copytree(tl, chat)
    manifest = json.loads((chat / "kiln.json").read_text())
    manifest["generation"]["chat_template"] = CHAT_TEMPLATE
    (chat / "kiln.json").unlink()  # a read-only copy of the shared artifact's
    (chat / "kiln.json").write_text(json.dumps(manifest, indent=2))
    # tiny-llama whose end-of-sequence token is the 5th greedy token of "Hello, world" (the random
    # model never emits its own): requests stop early unless they ask to ignore it
    eos = root / "eos"
    shutil.copytree(tl, eos)
    manifest = json.loads((eos / "kiln.json").read_text())
    manifest["generation"]["eos_token_ids"] = [kiln.load(tl).generate("Hello, world", 5).token_ids[4]]
    (eos / "kiln.json").unlink()
    (eos / "kiln.json").write_text(json.dumps(manifest, indent=2))
    return {"tl": tl, "tb": tb, "chat": chat, "eos": eos}


@pytest.fixture(scope="module")
def live(artifacts):
    server = Live([f"{name}={path}" for name, path in artifacts.items()],
                  "--max-body", "65536", "--max-batch", "8")
    yield server
    server.stop()


@pytest.fixture
def in_process(artifacts):
    from kiln.serve.models import load_all

    made = []

    def start(**settings) -> InProcess:
        served = load_all([f"tl={artifacts['tl']}"], threads=1, verify=False)
        made.append(InProcess(served, **settings))
        return made[-1]

    yield start
    for server in made:
        server.close()

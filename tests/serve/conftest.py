"""Fixtures for the serve tests: tiny-llama (fp32; a copy with a chat template, `chat`) and
tiny-bert artifacts, a live `kiln serve` over them, and in-process servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serve_helpers import CHAT_TEMPLATE, InProcess, Live

import kiln


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, prepared) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    prepared("tiny-llama")
    prepared("tiny-bert")
    tl = kiln.compile("tiny-llama", root / "tl", recipe="fp32", progress=False).path
    tb = kiln.compile("tiny-bert", root / "tb", progress=False).path
    chat = kiln.compile("tiny-llama", root / "chat", recipe="fp32", progress=False).path
    manifest = json.loads((chat / "kiln.json").read_text())
    manifest["generation"]["chat_template"] = CHAT_TEMPLATE
    (chat / "kiln.json").write_text(json.dumps(manifest, indent=2))
    return {"tl": tl, "tb": tb, "chat": chat}


@pytest.fixture(scope="module")
def live(artifacts):
    server = Live([f"tl={artifacts['tl']}", f"chat={artifacts['chat']}", f"tb={artifacts['tb']}"],
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

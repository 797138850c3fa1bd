"""The Node.js runtime's prompt lookup (examples/node, `--speculative lookup`): the same greedy
tokens as plain greedy decoding (Python's), on 20 prompts x 128 tokens, with drafts accepted
and rejected; an unknown draft is one line."""

from __future__ import annotations

import pytest
from speculative_prompts import PROMPTS
from test_node import NODE, node, node_json, node_pkg  # noqa: F401 (node_pkg: the fixture)

import kiln

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(NODE is None, reason="node is not on PATH (the Node.js runtime needs Node 20+)")]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, prepared):
    prepared("tiny-llama")
    return kiln.compile("tiny-llama", tmp_path_factory.mktemp("spec-node") / "a", recipe="fp32", progress=False).path


def test_lookup_gives_the_tokens_of_plain_greedy(node_pkg, tiny_llama):  # noqa: F811
    art = kiln.load(tiny_llama)
    proposed = accepted = 0
    for prompt in PROMPTS:
        got = node_json(node_pkg, "generate.js", str(tiny_llama), prompt, "-n", "128", "--json",
                        "--speculative", "lookup", "--draft-tokens", "4")
        assert got["token_ids"] == art.generate(prompt, 128).token_ids, prompt
        proposed += got["speculation"]["proposed"]
        accepted += got["speculation"]["accepted"]
    assert 0 < accepted < proposed  # drafts were both accepted and rejected


def test_unknown_draft_is_one_line(node_pkg, tiny_llama):  # noqa: F811
    proc = node(node_pkg, "generate.js", str(tiny_llama), "hi", "--speculative", "medusa")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == "error: unknown draft 'medusa': this runtime drafts by \"lookup\" only"
    proc = node(node_pkg, "generate.js", str(tiny_llama), "hi", "--draft-tokens", "2")
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --draft-tokens needs --speculative lookup"

import json

import pytest

import kiln
from kiln.models import get_source
from kiln.reference import reference_generate
from conftest import run_kiln


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_greedy_tokens_match_transformers(tmp_path, prepared, name):
    prepared(name)
    result = kiln.compile(name, tmp_path / name, progress=False)
    art = kiln.load(result.path)
    loaded = get_source(name).load()
    for prompt in ["Hello, world", "The quick brown fox", "1 2 3 4"]:
        gen = art.generate(prompt, 32)
        ref = reference_generate(art.manifest, gen.prompt_ids, 32, loaded=loaded)
        assert gen.token_ids == ref, prompt


def test_run_json_prints_new_tokens_only(tmp_path, prepared):
    prepared("tiny-llama")
    out = tmp_path / "a"
    assert run_kiln("compile", "tiny-llama", "-o", str(out), "-q").returncode == 0
    proc = run_kiln("run", str(out), "--prompt", "Hi", "-n", "5", "--json", "--check")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert len(payload["token_ids"]) == 5
    assert payload["reference"]["identical"] is True
    assert set(payload) >= {"text", "token_ids"}

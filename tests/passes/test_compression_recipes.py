"""The compression presets through `kiln.compile`: the structural pass runs before the KV cache,
packing and int4, and the artifact's manifest reflects the smaller model."""

import pytest

import kiln
from kiln.errors import KilnError
from kiln.passes.structural import parse_size_mb, retarget_steps
from kiln.recipes import load_recipe

pytestmark = pytest.mark.slow  # compiles the compression presets end to end


def test_pruned_int4_compiles_with_the_kv_cache_and_fused_gqa(tmp_path):
    result = kiln.compile("tiny-llama", tmp_path / "a", recipe="pruned-int4", progress=False)
    m = result.manifest
    records = {r["name"]: r for r in m["passes"]}
    heads = records["prune-heads"]["stats"]
    assert sum(map(int, heads["heads_after"].split(","))) < sum(map(int, heads["heads_before"].split(",")))
    assert records["prune-mlp"]["stats"]["params_removed"] > 0
    assert records["quantize-weights"]["modified"]
    assert m["kv_cache"]["num_layers"] == 2 and m["kv_cache"]["kv_heads"] == 2
    assert records["fuse-attention"]["stats"]["gqa_fused"] == 2
    assert m["summary"]["artifact"]["ops"].get("com.microsoft::GroupQueryAttention") == 2
    art = kiln.load(result.path)
    assert len(art.generate("hello", max_new_tokens=5).token_ids) == 5


def test_drop_layers_preset_gives_a_shorter_cache(tmp_path):
    result = kiln.compile("tiny-llama", tmp_path / "a", recipe="drop-layers", progress=False)
    assert result.manifest["kv_cache"]["num_layers"] == 1
    record = next(r for r in result.manifest["passes"] if r["name"] == "drop-layers")
    assert record["stats"]["params_removed"] > 0 and record["delta"]["kl"] is not None


def test_whole_model_targets_go_to_the_one_structural_pass():
    steps = retarget_steps(load_recipe("lowrank").steps, target_mb=60.0)
    assert dict(steps)["factorize-low-rank"]["target_mb"] == 60.0
    assert "target_params" not in dict(steps)["factorize-low-rank"]
    steps = retarget_steps(load_recipe("prune-heads").steps, target_params=0.9)
    assert dict(steps)["prune-heads"] == {"unit": "query", "budget": 5.0, "target_params": 0.9}
    with pytest.raises(KilnError, match="exactly one structural pass"):
        retarget_steps(load_recipe("pruned-int4").steps, target_params=0.8)
    with pytest.raises(KilnError, match=r"--target-params must be in \(0, 1\]"):
        retarget_steps(load_recipe("lowrank").steps, target_params=1.5)
    with pytest.raises(KilnError, match="--target-size must be > 0"):
        retarget_steps(load_recipe("lowrank").steps, target_mb=-3.0)
    assert parse_size_mb("60MB") == 60.0 and parse_size_mb("1.5 GB") == 1500.0

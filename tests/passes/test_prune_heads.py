
import numpy as np
import onnx_ir as ir
import pytest

from kiln.errors import KilnError
from kiln.ir import kv_layout
from kiln.ir.values import param_count
from kiln.passes import create_pass
from kiln.passes.analysis.attention_blocks import find_attention_blocks
from kiln.passes.analysis.linear import weight_of
from kiln.passes.fuse_attention import FuseAttentionPass
from kiln.passes.insert_kv_cache import InsertKVCachePass
from kiln.passes.kv_layout import decode_consistency
from kiln.passes.numerics import compare, run_ort
from kiln.passes.prune_heads import PruneHeadsPass


def _clone(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def _kept_heads(old: np.ndarray, new: np.ndarray, dh: int) -> list[int]:
    """Which old head blocks of W_q survive, found by matching columns."""
    blocks = [old[:, h * dh:(h + 1) * dh] for h in range(old.shape[1] // dh)]
    return [next(h for h, b in enumerate(blocks) if np.array_equal(b, new[:, j * dh:(j + 1) * dh]))
            for j in range(new.shape[1] // dh)]


@pytest.mark.parametrize("name,unit", [("tiny-llama", "query"), ("tiny-llama", "group"), ("tiny-qwen2", "query"),
                                       ("tiny-bert", "group")])
def test_removing_heads_is_zeroing_their_output_rows(cleaned, name, unit):
    _, model, feeds, calib = cleaned(name)
    reference = _clone(model)
    atts = find_attention_blocks(reference)[0]
    assert len(atts) == 2
    p = PruneHeadsPass(ratio=0.5, unit=unit, refit=False)
    p.calibration = calib
    result = p(model)
    assert result.modified
    for old, new in zip(atts, find_attention_blocks(model)[0]):
        kept = _kept_heads(weight_of(old.q), weight_of(new.q), old.head_dim)
        assert len(kept) == old.heads // 2 and new.heads == len(kept)
        wo = weight_of(old.o).copy()
        for h in set(range(old.heads)) - set(kept):
            wo[h * old.v_head_dim:(h + 1) * old.v_head_dim] = 0
        old.o.inputs[1].const_value = ir.tensor(wo)
    delta = compare(run_ort(reference, feeds), run_ort(model, feeds))
    assert delta["max_rel"] < 1e-5, delta


@pytest.mark.parametrize("name,unit,kv_heads", [("tiny-llama", "query", 2), ("tiny-llama", "group", 1),
                                                pytest.param("tiny-qwen2", "query", 1, marks=pytest.mark.slow)])
def test_pruned_model_takes_the_kv_cache_and_fuses_gqa(cleaned, name, unit, kv_heads):
    _, model, _feeds, calib = cleaned(name)
    p = PruneHeadsPass(ratio=0.5, unit=unit)
    p.calibration = calib
    p(model)
    assert InsertKVCachePass()(model).modified
    assert kv_layout(model).kv_heads == kv_heads
    result = FuseAttentionPass()(model)
    assert result.stats["gqa_fused"] == 2, result.warnings
    assert decode_consistency(model) < 1e-4


def test_target_params_query_heads(cleaned):
    _, model, _, calib = cleaned("tiny-llama")
    total = param_count(model)
    p = PruneHeadsPass(target_params=0.95)
    p.calibration = calib
    result = p(model)
    assert param_count(model) / total <= 0.95
    assert result.stats["heads_after"] in ("2,4", "4,2", "2,2")


def test_errors(cleaned):
    _, model, _, calib = cleaned("tiny-bert")
    p = PruneHeadsPass(ratio=0.5)
    p.calibration = calib
    with pytest.raises(KilnError, match="use unit='group'"):
        p(model)
    with pytest.raises(KilnError, match="unit must be"):
        create_pass("prune-heads", {"ratio": 0.5, "unit": "heads"})
    _, model, _, calib = cleaned("tiny-llama")
    p = PruneHeadsPass(target_params=0.5)
    p.calibration = calib
    with pytest.raises(KilnError, match="cannot remove"):
        p(model)

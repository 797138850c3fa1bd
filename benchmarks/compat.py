"""Compatibility matrix: tiny random-init transformers models of many families, compiled by path.

    python -m benchmarks.compat [--only NAME ...] [--fast] [--skip-int4] [--jobs N]
                                [--out docs/compatibility.md] [--list]

Each family is a tiny, seeded, random-init model (hidden 64, 2 layers, 4 heads of 16, a
320-token byte vocabulary, initializer_range 0.2 so that greedy argmax has clear margins)
saved with `save_pretrained` into a folder together with kiln's byte-level tokenizer.json
(BERT-style for encoders), then compiled BY PATH: `kiln.compile(folder, out, recipe="fp32")`.

For each family the matrix records:
- compiled, or the one-line refusal (a KilnError's message). Any other exception type, a
  KilnError that only wraps a foreign exception (a NameError, an ONNX Runtime failure: a crash
  reported through the pipeline, not a refusal) or a crashed subprocess is an INTERNAL ERROR;
- KV layers (insert-kv-cache's stats), attention fusions (fuse-attention: GroupQueryAttention,
  MultiHeadAttention) and the other fusions that fired, the compile-time parity gate's max_rel;
- decoders: greedy parity over 32 new tokens, the artifact's `generate` (and a batch of two
  prompts of different lengths through `generate_batch`) against transformers'
  `generate(do_sample=False)` on the same PyTorch model, stop tokens off on both sides; the
  prompt (12 byte tokens) plus 32 tokens is longer than every sliding window declared here;
- encoders: the cosine of the artifact's mean-pooled embeddings with PyTorch's on the same
  token ids (three texts of different lengths, padded); the reranker: the classifier logits'
  max abs difference (1e-4 allowed);
- whether the `int4` recipe compiles (a short calibration text; --skip-int4 skips it).

A family that compiles but does not match (greedy < 32/32, cosine < 0.9999, logits off by
more than 1e-4) is a SILENT MISMATCH: the worst outcome, the project's goal is zero of them.

Every family runs in its own subprocess (a crash or a hang stops only that family). The
script writes docs/compatibility.md (header, table, counts, the refusal and error messages)
and exits 1 if any family is a silent mismatch or an internal error.
`run_family(name)` runs one family in-process (the CI test uses it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "compatibility.md"

V, H, LAYERS, HEADS, HEAD_DIM = 320, 64, 2, 4, 16
EOS = PAD = 256  # the byte tokenizer's <|endoftext|>
BERT_PAD = 259  # [PAD]
NEW_TOKENS = 32
MIN_COSINE = 0.9999
MAX_LOGIT_DIFF = 1e-4
# 12 byte tokens, and a shorter second prompt for the batch of two (different lengths: left padding).
PROMPT = list(b"Once upon a ")
PROMPT_SHORT = list(b"def f(x")
TEXTS = ["kiln compiles transformer models",
         "a much longer second sentence, so that the padding in this batch of texts matters to every row", "hi"]
QUERIES = ["what is a kiln", "what is a kiln", "capital of france"]
PASSAGES = ["a kiln is an oven for firing pottery and bricks", "the weather is nice", "paris"]
CALIBRATION = ("The kiln fires the clay at a high temperature. Compilers translate programs written in one "
               "language into another, checking each step. A transformer reads a sequence of tokens and "
               "predicts the next one; its attention looks back at every earlier token. ") * 6


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "decoder" | "encoder" | "reranker"
    config: str  # transformers config class
    model: str  # transformers model class
    kwargs: dict
    feature: str = ""  # what this family exercises
    fast: bool = False  # in the --fast subset (and the CI test)


def _llama_like(**kw) -> dict:
    base = dict(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HEAD_DIM, max_position_embeddings=512,
                initializer_range=0.2, bos_token_id=None, eos_token_id=EOS, pad_token_id=PAD)
    base.update(kw)
    return base


def _encoder(**kw) -> dict:
    base = dict(vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=128, max_position_embeddings=512, initializer_range=0.2, pad_token_id=BERT_PAD)
    base.update(kw)
    return base


_SPECIAL = dict(bos_token_id=None, eos_token_id=EOS, pad_token_id=PAD)

FAMILIES: dict[str, Family] = {f.name: f for f in [
    # --- decoders ---------------------------------------------------------------------------
    Family("llama", "decoder", "LlamaConfig", "LlamaForCausalLM", _llama_like(), "GQA 4/2, RoPE", fast=True),
    Family("mistral-swa16", "decoder", "MistralConfig", "MistralForCausalLM", _llama_like(sliding_window=16),
           "sliding window 16 < sequence", fast=True),
    Family("mixtral", "decoder", "MixtralConfig", "MixtralForCausalLM",
           _llama_like(num_local_experts=4, num_experts_per_tok=2, sliding_window=None), "mixture of experts"),
    Family("qwen2", "decoder", "Qwen2Config", "Qwen2ForCausalLM",
           _llama_like(num_key_value_heads=1, tie_word_embeddings=False), "GQA 4/1, qkv biases", fast=True),
    Family("qwen3", "decoder", "Qwen3Config", "Qwen3ForCausalLM", _llama_like(), "q/k RMSNorm"),
    Family("phi", "decoder", "PhiConfig", "PhiForCausalLM",
           dict(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=512, partial_rotary_factor=0.5,
                initializer_range=0.2, **_SPECIAL), "partial rotary, parallel attention/MLP"),
    Family("phi3", "decoder", "Phi3Config", "Phi3ForCausalLM", _llama_like(tie_word_embeddings=False),
           "fused qkv / gate_up projections"),
    Family("gemma", "decoder", "GemmaConfig", "GemmaForCausalLM", _llama_like(num_key_value_heads=1),
           "MQA, scaled embeddings"),
    Family("gemma2-swa16", "decoder", "Gemma2Config", "Gemma2ForCausalLM",
           _llama_like(sliding_window=16, query_pre_attn_scalar=16),
           "logit softcapping, alternating sliding window 16"),
    Family("gemma3-swa16", "decoder", "Gemma3TextConfig", "Gemma3ForCausalLM",
           _llama_like(sliding_window=16, query_pre_attn_scalar=16,
                       layer_types=["sliding_attention", "full_attention"]),
           "q/k norm, sliding window 16 + global layer, two RoPE bases"),
    Family("gpt2", "decoder", "GPT2Config", "GPT2LMHeadModel",
           dict(vocab_size=V, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=512, initializer_range=0.2,
                **_SPECIAL), "learned positions, Conv1D", fast=True),
    Family("gptj", "decoder", "GPTJConfig", "GPTJForCausalLM",
           dict(vocab_size=V, n_embd=H, n_layer=LAYERS, n_head=HEADS, rotary_dim=8, n_positions=512,
                initializer_range=0.2, tie_word_embeddings=False, **_SPECIAL),
           "interleaved (rotate-every-two) partial rotary"),
    Family("gpt-neox", "decoder", "GPTNeoXConfig", "GPTNeoXForCausalLM",
           dict(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=512, rotary_pct=0.25, initializer_range=0.2,
                **_SPECIAL), "partial rotary (25%), parallel residual"),
    Family("gpt-neo-local16", "decoder", "GPTNeoConfig", "GPTNeoForCausalLM",
           dict(vocab_size=V, hidden_size=H, num_layers=LAYERS, num_heads=HEADS, max_position_embeddings=512,
                attention_types=[[["global", "local"], 1]], window_size=16, initializer_range=0.2, **_SPECIAL),
           "local attention window 16 (alternating), unscaled scores"),
    Family("gpt-bigcode-mqa", "decoder", "GPTBigCodeConfig", "GPTBigCodeForCausalLM",
           dict(vocab_size=V, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=512, multi_query=True,
                initializer_range=0.2, **_SPECIAL), "multi-query attention"),
    Family("bloom-alibi", "decoder", "BloomConfig", "BloomForCausalLM",
           dict(vocab_size=V, hidden_size=H, n_layer=LAYERS, n_head=HEADS, initializer_range=0.2, **_SPECIAL),
           "ALiBi", fast=True),
    Family("falcon-mqa-parallel", "decoder", "FalconConfig", "FalconForCausalLM",
           dict(vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                multi_query=True, parallel_attn=True, new_decoder_architecture=False, alibi=False, bias=False,
                max_position_embeddings=512, initializer_range=0.2, **_SPECIAL),
           "multi-query, parallel attention, RoPE"),
    Family("falcon-alibi", "decoder", "FalconConfig", "FalconForCausalLM",
           dict(vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                multi_query=False, parallel_attn=False, new_decoder_architecture=False, alibi=True, bias=True,
                max_position_embeddings=512, initializer_range=0.2, **_SPECIAL), "ALiBi (falcon-rw layout)"),
    Family("opt", "decoder", "OPTConfig", "OPTForCausalLM",
           dict(vocab_size=V, hidden_size=H, ffn_dim=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                max_position_embeddings=512, word_embed_proj_dim=H, init_std=0.2, bos_token_id=EOS,
                eos_token_id=EOS, pad_token_id=PAD), "learned positions from the mask (cumsum, offset 2)"),
    Family("codegen", "decoder", "CodeGenConfig", "CodeGenForCausalLM",
           dict(vocab_size=V, n_embd=H, n_layer=LAYERS, n_head=HEADS, rotary_dim=8, n_positions=512, n_ctx=512,
                initializer_range=0.2, tie_word_embeddings=False, **_SPECIAL),
           "interleaved partial rotary, mp_num-packed qkv"),
    Family("stablelm", "decoder", "StableLmConfig", "StableLmForCausalLM",
           _llama_like(num_key_value_heads=4, partial_rotary_factor=0.25, tie_word_embeddings=False),
           "partial rotary (25%), LayerNorm"),
    Family("starcoder2", "decoder", "Starcoder2Config", "Starcoder2ForCausalLM",
           _llama_like(sliding_window=None, tie_word_embeddings=True), "biases, LayerNorm, GELU MLP"),
    Family("olmo", "decoder", "OlmoConfig", "OlmoForCausalLM", _llama_like(), "non-parametric LayerNorm"),
    Family("olmo2", "decoder", "Olmo2Config", "Olmo2ForCausalLM", _llama_like(), "post-norm, q/k norm"),
    Family("cohere", "decoder", "CohereConfig", "CohereForCausalLM", _llama_like(use_qk_norm=False),
           "interleaved rotary, logit scale, parallel block"),
    Family("granite", "decoder", "GraniteConfig", "GraniteForCausalLM",
           _llama_like(embedding_multiplier=4.0, logits_scaling=2.0, residual_multiplier=0.5,
                       attention_multiplier=0.125), "embedding/residual/attention/logit multipliers"),
    Family("glm", "decoder", "GlmConfig", "GlmForCausalLM", _llama_like(), "interleaved partial rotary (50%)"),
    Family("smollm3", "decoder", "SmolLM3Config", "SmolLM3ForCausalLM",
           _llama_like(no_rope_layers=[1, 0]), "a layer without RoPE (NoPE)"),
    Family("mpt-alibi", "decoder", "MptConfig", "MptForCausalLM",
           dict(vocab_size=V, d_model=H, n_heads=HEADS, n_layers=LAYERS, expansion_ratio=2, max_seq_len=512,
                attn_config={"alibi": True}, initializer_range=0.2, **_SPECIAL), "ALiBi (MPT), no biases"),
    # --- encoders ---------------------------------------------------------------------------
    Family("bert", "encoder", "BertConfig", "BertModel", _encoder(), "absolute positions", fast=True),
    Family("roberta", "encoder", "RobertaConfig", "RobertaModel", _encoder(), "positions after padding_idx"),
    Family("distilbert", "encoder", "DistilBertConfig", "DistilBertModel",
           dict(vocab_size=V, dim=H, n_layers=LAYERS, n_heads=HEADS, hidden_dim=128, max_position_embeddings=512,
                initializer_range=0.2, pad_token_id=BERT_PAD), "no token types"),
    Family("albert", "encoder", "AlbertConfig", "AlbertModel", _encoder(embedding_size=32),
           "shared layers, factorized embeddings"),
    Family("electra", "encoder", "ElectraConfig", "ElectraModel", _encoder(embedding_size=32),
           "embedding projection"),
    Family("xlm-roberta", "encoder", "XLMRobertaConfig", "XLMRobertaModel", _encoder(), "RoBERTa layout"),
    Family("mpnet", "encoder", "MPNetConfig", "MPNetModel", _encoder(), "relative position bias"),
    Family("deberta-v2", "encoder", "DebertaV2Config", "DebertaV2Model",
           _encoder(relative_attention=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                    max_relative_positions=-1), "disentangled relative-position attention"),
    Family("modernbert", "encoder", "ModernBertConfig", "ModernBertModel",
           _encoder(local_attention=16, layer_types=["full_attention", "sliding_attention"], bos_token_id=257,
                    eos_token_id=258, cls_token_id=257, sep_token_id=258),
           "RoPE, local attention window 16"),
    Family("bert-reranker", "reranker", "BertConfig", "BertForSequenceClassification", _encoder(num_labels=1),
           "cross-encoder (sequence classification, 1 label)"),
]}

FAST = [f.name for f in FAMILIES.values() if f.fast]


# --- one family ---------------------------------------------------------------------------

def build(family: Family):
    """The seeded random-init PyTorch model of `family`."""
    import torch
    import transformers

    config = getattr(transformers, family.config)(**family.kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, family.model)(config)
    return model.eval()


def save(model, family: Family, folder: Path) -> None:
    from kiln.models.tiny import byte_tokenizer

    model.save_pretrained(folder)
    byte_tokenizer(bert_style=family.kind != "decoder").save(str(folder / "tokenizer.json"))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def classify_error(exc: BaseException) -> tuple[str, str]:
    """("refused", message) for a KilnError raised as such, ("internal", message) for anything
    else: another exception type, or a KilnError that only reports a foreign exception (the
    pipeline's "failed: NameError: ...", "produced a model ORT cannot run: ...")."""
    from kiln.errors import KilnError

    text = str(exc).strip()
    if not isinstance(exc, KilnError):
        return "internal", f"{type(exc).__name__}: {_one_line(text)}"
    cause = exc.__cause__
    if cause is not None and not isinstance(cause, KilnError) and (
            f"{type(cause).__name__}:" in text or "ORT cannot run" in text):
        return "internal", f"{type(exc).__name__} wrapping {type(cause).__name__}: {_one_line(text)}"
    if "\n" in text:
        return "refused", f"(NOT ONE LINE: {len(text.splitlines())} lines) {_one_line(text)}"
    return "refused", text


def _record(manifest: dict, name: str) -> dict | None:
    return next((r for r in manifest.get("passes", []) if r.get("name") == name), None)


def pass_summary(manifest: dict) -> dict:
    """KV layers, attention fusions and the other fusions that fired, from the manifest's records."""
    kv = _record(manifest, "insert-kv-cache")
    fa = _record(manifest, "fuse-attention")
    out: dict[str, Any] = {"kv_layers": (kv or {}).get("stats", {}).get("kv_layers")}
    kv_stats = (kv or {}).get("stats", {})
    out["kv_forms"] = {k: v for k, v in kv_stats.items() if k in ("sliding_window_layers", "alibi_layers",
                                                                    "softcap_layers") and v}
    fa_stats = (fa or {}).get("stats", {})
    out["gqa"] = fa_stats.get("gqa_fused")
    out["mha"] = fa_stats.get("mha_fused")
    out["gqa_rotary"] = fa_stats.get("gqa_with_rotary")
    out["attention_rejected"] = [_one_line(r) for r in (fa or {}).get("rejected", [])][:3]
    out["kv_rejected"] = [_one_line(r) for r in (kv or {}).get("rejected", [])][:3]
    others = {}
    for r in manifest.get("passes", []):
        name = r.get("name", "")
        if name == "fuse-attention" or not name.startswith(("fuse-", "pack-")):
            continue
        fired = {k: v for k, v in (r.get("stats") or {}).items()
                 if isinstance(v, int) and not isinstance(v, bool) and v > 0 and not k.endswith(("seen", "checked"))}
        if fired:
            others[name] = fired
    out["other_fusions"] = others
    parity = manifest.get("compile", {}).get("parity") or {}
    out["gate"] = parity
    return out


def _gate_max_rel(gate: dict) -> float | None:
    for key in ("max_rel", "delta"):
        v = gate.get(key)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, dict) and isinstance(v.get("max_rel"), (int, float)):
            return float(v["max_rel"])
    return None


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reference_greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens (stop tokens off) and each step's top-1 margin (logit units)."""
    import torch

    gen = model.generation_config
    gen.eos_token_id = None  # 32 tokens on both sides: no stop token
    gen.pad_token_id = PAD
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
                             max_new_tokens=NEW_TOKENS, min_new_tokens=0, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=PAD)
    tokens = out.sequences[0, len(prompt):].tolist()
    margins = []
    for s in out.scores:
        top = torch.topk(s[0].float(), 2).values
        margins.append(float(top[0] - top[1]))
    return tokens, margins


def check_decoder(model, art) -> dict:
    ref, margins = reference_greedy(model, PROMPT)
    got = art.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_token_ids=()).token_ids
    single = _prefix(got, ref)
    res: dict[str, Any] = {"greedy": single, "greedy_of": NEW_TOKENS, "ref_len": len(ref), "got_len": len(got),
                           "min_ref_margin": round(min(margins), 4) if margins else None}
    if single < NEW_TOKENS and single < len(margins):
        res["margin_at_divergence"] = round(margins[single], 4)
    ref_short, _ = reference_greedy(model, PROMPT_SHORT)
    try:
        rows = art.generate_batch([PROMPT, PROMPT_SHORT], max_new_tokens=NEW_TOKENS, stop_token_ids=())
        res["batch"] = min(_prefix(rows[0].token_ids, ref), _prefix(rows[1].token_ids, ref_short))
    except Exception as exc:  # noqa: BLE001 - recorded: the single-prompt result still stands
        kind, message = classify_error(exc)
        res["batch"] = 0
        res["batch_error"] = f"{kind}: {message}"
    res["match"] = single == NEW_TOKENS and res["batch"] == NEW_TOKENS and len(ref) == NEW_TOKENS
    return res


def _torch_feeds(model, feeds: dict) -> dict:
    import inspect

    import torch

    params = inspect.signature(model.forward).parameters
    return {k: torch.from_numpy(v) for k, v in feeds.items() if k in params}


def check_encoder(model, art) -> dict:
    import numpy as np
    import torch

    feeds = art.tokenize_batch(TEXTS)
    got = art.embed(TEXTS)
    with torch.no_grad():
        hidden = model(**_torch_feeds(model, feeds)).last_hidden_state.double().numpy()
    mask = feeds["attention_mask"][..., None].astype(np.float64)
    ref = (hidden * mask).sum(1) / mask.sum(1)
    a, b = got.astype(np.float64), ref
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    pooling = art.manifest.get("embedding", {}).get("pooling")
    return {"cosine": float(cos.min()), "pooling": pooling,
            "match": bool(cos.min() >= MIN_COSINE) and pooling == "mean"}


def check_reranker(model, art) -> dict:
    import numpy as np
    import torch

    spec = art.classification
    feeds = art.tokenize_batch(QUERIES, PASSAGES, spec.max_sequence_length, art.pad_id)
    got = np.stack([s.logits for s in art.classify(QUERIES, pairs=PASSAGES)])
    with torch.no_grad():
        ref = model(**_torch_feeds(model, feeds)).logits.numpy()
    diff = float(np.abs(got.astype(np.float64) - ref).max())
    return {"logit_max_abs_diff": diff, "match": diff <= MAX_LOGIT_DIFF}


def _compile(folder: Path, out: Path, recipe: str, **kw) -> tuple[str, str | None, dict | None, float]:
    # kiln.compile's body (imported from kiln.compiler, which also works where a tests/kiln folder
    # on sys.path makes `kiln` a namespace package, as under a bare `pytest`)
    from kiln.compiler import compile as kiln_compile

    start = time.perf_counter()
    try:
        result = kiln_compile(str(folder), out, recipe=recipe, force=True, progress=False, **kw)
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the matrix
        kind, message = classify_error(exc)
        return kind, message, None, time.perf_counter() - start
    return "compiled", None, result.manifest, time.perf_counter() - start


def run_family(name: str, workdir: Path | None = None, skip_int4: bool = False) -> dict:
    """One row of the matrix, computed in this process."""
    family = FAMILIES[name]
    start = time.perf_counter()
    row: dict[str, Any] = {"name": name, "kind": family.kind, "class": family.model, "feature": family.feature}
    with tempfile.TemporaryDirectory(prefix=f"kiln-compat-{name}-", dir=workdir) as tmp:
        tmp = Path(tmp)
        try:
            model = build(family)
            save(model, family, tmp / "src")
        except Exception as exc:  # noqa: BLE001
            row.update(status="setup", message=f"could not build the PyTorch model: {type(exc).__name__}: "
                                                  f"{_one_line(exc)}", seconds=round(time.perf_counter() - start, 1))
            return row
        row["parameters"] = sum(p.numel() for p in model.parameters())
        status, message, manifest, seconds = _compile(tmp / "src", tmp / "fp32", "fp32")
        row["compile_seconds"] = round(seconds, 1)
        if status != "compiled":
            row.update(status=status, message=message, seconds=round(time.perf_counter() - start, 1))
            return row
        row.update(pass_summary(manifest))
        row["gate_max_rel"] = _gate_max_rel(row["gate"])
        row["kv_cache"] = {k: manifest["kv_cache"].get(k) for k in ("max_positions", "num_layers", "kv_heads")
                           if k in manifest["kv_cache"]} if "kv_cache" in manifest else None
        try:
            from kiln.runtime import load

            art = load(tmp / "fp32")
            check = {"decoder": check_decoder, "encoder": check_encoder, "reranker": check_reranker}[family.kind]
            row.update(check(model, art))
            row["status"] = "match" if row["match"] else "silent-mismatch"
        except Exception as exc:  # noqa: BLE001 - the artifact was written but does not run: a bug
            kind, message = classify_error(exc)
            row.update(status="internal", message=f"the compiled artifact failed at run time ({kind}): {message}",
                       traceback=traceback.format_exc(limit=-3))
        if not skip_int4:
            calib = tmp / "calibration.txt"
            calib.write_text(CALIBRATION)
            status4, message4, _, seconds4 = _compile(tmp / "src", tmp / "int4", "int4", calibration=calib)
            row["int4"] = {"status": status4, "message": message4, "seconds": round(seconds4, 1),
                           "measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


# --- the matrix ---------------------------------------------------------------------------

def _run_subprocess(name: str, skip_int4: bool, timeout: float) -> dict:
    """One family in its own process (a crash, a hang or a leak ends with it)."""
    start = time.perf_counter()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = Path(f.name)
    cmd = [sys.executable, "-m", "benchmarks.compat", "--worker", name, "--result", str(result_file)]
    if skip_int4:
        cmd.append("--skip-int4")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              check=False)
        text = result_file.read_text() if result_file.exists() else ""
        if proc.returncode == 0 and text:
            return json.loads(text)
        tail = _one_line((proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""])
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        message = f"the subprocess crashed ({how}): {tail}"
    except subprocess.TimeoutExpired:
        message = f"the subprocess did not finish within {timeout:.0f} s"
    finally:
        result_file.unlink(missing_ok=True)
    family = FAMILIES[name]
    return {"name": name, "kind": family.kind, "class": family.model, "feature": family.feature,
            "status": "internal", "message": message, "seconds": round(time.perf_counter() - start, 1)}


def _versions() -> dict:
    from importlib.metadata import version

    import onnxruntime
    import torch
    import transformers

    return {"kiln": version("kiln"), "torch": torch.__version__,
            "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))) / 2**20
        mem_text = f", {mem:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        mem_text = ""
    try:
        load = f"; load average {os.getloadavg()[0]:.1f} when this was written (the machine is shared)"
    except OSError:
        load = ""
    return f"{cpu}, {os.cpu_count()} cores{mem_text}, {platform.system()} {platform.release()}{load}"


def _commit() -> str:
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return (head[:90] + ("…" if len(head) > 90 else "")) + (" (+ uncommitted changes in the tree)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def counts(rows: list[dict]) -> dict[str, int]:
    c = {"match": 0, "refused": 0, "silent-mismatch": 0, "internal": 0, "setup": 0}
    for r in rows:
        c[r["status"]] = c.get(r["status"], 0) + 1
    return c


def _fusions(r: dict) -> str:
    if r.get("gqa") is None and r.get("mha") is None:
        parts = []
    else:
        rot = f" ({r['gqa_rotary']} with rotary)" if r.get("gqa_rotary") else ""
        parts = [f"GQA {r.get('gqa') or 0}{rot}, MHA {r.get('mha') or 0}"]
    short = {"fuse-rms-norm": "RMSNorm", "fuse-layer-norm": "LayerNorm", "fuse-gelu": "GELU",
             "pack-matmuls": "packed MatMul", "pack-attention-qkv": "packed QKV"}
    for name, fired in r.get("other_fusions", {}).items():
        stats = ", ".join(f"{k.replace('_fused', '').replace('_', ' ')} {v}" for k, v in fired.items())
        parts.append(f"{short.get(name, name)}: {stats}")
    return "; ".join(parts) or "—"


def _parity_cell(r: dict) -> str:
    if r["status"] not in ("match", "silent-mismatch") and "greedy" not in r and "cosine" not in r:
        return "—"
    if r["kind"] == "decoder":
        text = f"{r.get('greedy', 0)}/{NEW_TOKENS}, batch {r.get('batch', 0)}/{NEW_TOKENS}"
        if "margin_at_divergence" in r:
            text += f" (margin {r['margin_at_divergence']:.3g} at divergence)"
        return text
    if r["kind"] == "encoder":
        return f"cos {r['cosine']:.6f}"
    return f"max abs diff {r['logit_max_abs_diff']:.2e}"


def _status_cell(r: dict) -> str:
    if r["status"] == "refused" and (r.get("message") or "").startswith("parity gate"):
        return "refused by the parity gate"
    return {"match": "✅ match", "refused": "refused (one line)", "silent-mismatch": "❌ **SILENT MISMATCH**",
            "internal": "💥 **INTERNAL ERROR**", "setup": "not built"}[r["status"]]


def _int4_cell(r: dict) -> str:
    i = r.get("int4")
    if not i:
        return "not measured" if r["status"] in ("match", "silent-mismatch") else "—"
    earlier = " †" if i.get("reused") else ""
    if i["status"] == "compiled":
        return f"yes ({i['seconds']:.0f} s){earlier}"
    return ("refused" if i["status"] == "refused" else "💥 **internal error**") + earlier


def int4_counts(rows: list[dict]) -> dict[str, int]:
    c = {"compiled": 0, "refused": 0, "internal": 0}
    for r in rows:
        if r.get("int4") and r["status"] in ("match", "silent-mismatch"):
            c[r["int4"]["status"]] = c.get(r["int4"]["status"], 0) + 1
    return c


def render(rows: list[dict], args_text: str, seconds: float, skip_int4: bool, tree: str | None = None) -> str:
    v = _versions()
    c = counts(rows)
    c4 = int4_counts(rows)
    reused = sorted({r["int4"].get("measured", "?") for r in rows if (r.get("int4") or {}).get("reused")})
    if skip_int4 and not reused:
        int4_text = "skipped (--skip-int4)"
    elif skip_int4:
        int4_text = (f"not compiled in this run (--skip-int4); † results of an earlier run of this script on the same "
                     f"family ({', '.join(reused)}; `--int4-from`) where that run compiled it in fp32 too, "
                     "the `int4` recipe calibrated on a short text (about "
                     f"{len(CALIBRATION) // 100 / 10:g}k bytes); compile time in the column")
    else:
        int4_text = ("the `int4` recipe (GPTQ, 100 steps of scale tuning) calibrated on a short text (about "
                     f"{len(CALIBRATION) // 100 / 10:g}k bytes, a few windows of 256 tokens); compile time in the column")
        if reused:
            int4_text += (f"; † taken from an earlier run of this script on the same family ({', '.join(reused)}; "
                          "`--int4-from`), where that run compiled it in fp32 too")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Compatibility matrix",
        "",
        ("Tiny random-init transformers models (hidden 64, 2 layers, 4 heads of 16, 320-token byte vocabulary, "
        "seeded, initializer_range 0.2), saved with `save_pretrained` with kiln's byte tokenizer and compiled "
        "**by path** (`kiln.compile(folder, out, recipe=\"fp32\")`). Decoders: greedy tokens of the artifact "
        f"(`generate`, and a batch of two prompts of 12 and {len(PROMPT_SHORT)} tokens through `generate_batch`) "
        f"against transformers' `generate(do_sample=False)`, {NEW_TOKENS} new tokens, stop tokens off; "
        f"prompt + {NEW_TOKENS} tokens = {len(PROMPT) + NEW_TOKENS} positions, longer than every sliding window here. "
        f"Encoders: cosine of the mean-pooled embeddings with PyTorch's (3 texts, padded; ≥ {MIN_COSINE}). "
        f"Reranker: classifier logits within {MAX_LOGIT_DIFF:g}. "
        "A family that compiles but does not match is a **SILENT MISMATCH**; an exception that is not a "
        "kiln refusal (or a kiln error that only wraps one) is an **INTERNAL ERROR**."),
        "",
        f"- Command: `{args_text}` ({seconds / 60:.1f} min)",
        f"- Date: {now}; tree: {tree or _commit()}",
        (f"- Versions: kiln {v['kiln']}, torch {v['torch']}, transformers {v['transformers']}, "
         f"onnxruntime {v['onnxruntime']}, Python {v['python']}"),
        f"- Machine: {_machine()}",
        f"- int4: {int4_text}",
        "",
        f"**{c['match']} compiled and matching, {c['refused']} refused in one line, "
        f"{c['silent-mismatch']} silent mismatches, {c['internal']} internal errors**"
        + (f", {c['setup']} not built" if c.get("setup") else "") + f" ({len(rows)} families)."
        + ("" if not any(r.get("int4") for r in rows) else
           f" int4 recipe, of the families that compile: {c4['compiled']} compiled, {c4['refused']} refused, "
           f"{c4['internal']} internal errors."),
        "",
        "| Family | Class | Exercises | Result | KV layers | Attention / other fusions | Gate max_rel | Parity | int4 | Time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kv = r.get("kv_layers")
        forms = ", ".join(f"{k.replace('_layers', '')} {v}" for k, v in (r.get("kv_forms") or {}).items())
        kv_text = "—" if kv is None else f"{kv}" + (f" ({forms})" if forms else "")
        gate = r.get("gate_max_rel")
        lines.append("| " + " | ".join([
            f"`{r['name']}`", r["class"], r.get("feature", ""), _status_cell(r), kv_text,
            _fusions(r) if r["status"] in ("match", "silent-mismatch") or "gqa" in r else "—",
            "—" if gate is None else f"{gate:.2g}", _parity_cell(r), _int4_cell(r), f"{r.get('seconds', 0):.0f}",
        ]).replace("\n", " ") + " |")
    details = [r for r in rows if r.get("message") or (r.get("int4") or {}).get("message") or r.get("batch_error")
               or r.get("attention_rejected")]
    if details:
        lines += ["", "## Messages", "",
                  "Refusals and errors as kiln reported them; the fuse-attention reasons where attention stayed unfused.", ""]
        for r in details:
            if r.get("message"):
                lines.append(f"- `{r['name']}` ({r['status']}): {r['message']}")
            if r.get("batch_error"):
                lines.append(f"- `{r['name']}` batch of two: {r['batch_error']}")
            i = r.get("int4") or {}
            if i.get("message"):
                lines.append(f"- `{r['name']}` int4 ({i['status']}): {i['message']}")
            if r.get("attention_rejected") and not (r.get("gqa") or r.get("mha")):
                lines.append(f"- `{r['name']}` fuse-attention: " + "; ".join(r["attention_rejected"]))
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these families only")
    parser.add_argument("--fast", action="store_true", help=f"the fast subset ({', '.join(FAST)})")
    parser.add_argument("--skip-int4", action="store_true", help="do not compile the int4 recipe")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the markdown file to write")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--int4-from", type=Path, metavar="JSON",
                        help="reuse the int4 results of an earlier run's --json for the families that compiled "
                             "in fp32 then and now (int4 takes minutes per family); others are compiled afresh")
    parser.add_argument("--jobs", type=int, default=1, help="families run in parallel (subprocesses)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per family")
    parser.add_argument("--list", action="store_true", help="list the families and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one family, in this process, result as JSON
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        row = run_family(args.worker, skip_int4=args.skip_int4)
        args.result.write_text(json.dumps(row, default=str))
        return 0
    if args.list:
        for f in FAMILIES.values():
            print(f"{f.name:22s} {f.kind:9s} {f.model:32s} {f.feature}")
        return 0
    names = args.only or (FAST if args.fast else list(FAMILIES))
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown families: {', '.join(unknown)} (known: {', '.join(FAMILIES)})")
    start = time.perf_counter()
    command = "python -m benchmarks.compat " + " ".join(argv if argv is not None else sys.argv[1:])
    tree = f"at the start: {_commit()}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    earlier = {}
    if args.int4_from:
        earlier = {r["name"]: r for r in json.loads(args.int4_from.read_text())
                   if r.get("int4") and r["status"] in ("match", "silent-mismatch")}

    lock, done = threading.Lock(), []

    def one(name: str) -> dict:
        reuse = (earlier.get(name) or {}).get("int4")
        row = _run_subprocess(name, args.skip_int4 or reuse is not None, args.timeout)
        if reuse is not None and row["status"] in ("match", "silent-mismatch"):
            row["int4"] = {**reuse, "reused": True}
        with lock:  # the rows so far, so that an interrupted matrix still leaves its results
            done.append(row)
            if args.json:
                args.json.write_text(json.dumps(done, indent=1, default=str))
            order = {n: i for i, n in enumerate(names)}
            partial = sorted(done, key=lambda r: order[r["name"]])
            args.out.write_text(render(partial, command + f" (partial: {len(done)} of {len(names)} families so far)",
                                       time.perf_counter() - start, args.skip_int4, tree))
        print(f"{name:22s} {row['status']:16s} {row.get('seconds', 0):6.1f} s  "
              f"{_parity_cell(row) if row['status'] in ('match', 'silent-mismatch') else (row.get('message') or '')[:110]}",
              flush=True)
        return row

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(one, names))
    seconds = time.perf_counter() - start
    if f"at the start: {_commit()}" != tree:
        tree += f"; at the end: {_commit()}"
    args.out.write_text(render(rows, command.strip(), seconds, args.skip_int4, tree))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    c, c4 = counts(rows), int4_counts(rows)
    print(f"{c['match']} compiled and matching, {c['refused']} refused in one line, {c['silent-mismatch']} silent "
          f"mismatches, {c['internal']} internal errors ({len(rows)} families, {seconds / 60:.1f} min) -> {args.out}")
    return 1 if c["silent-mismatch"] or c["internal"] or c.get("setup") or c4["internal"] else 0


if __name__ == "__main__":
    sys.exit(main())

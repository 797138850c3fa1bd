"""A tiny Llama written as a GGUF file, as llama.cpp's converter lays it out: block-quantized
projections (Q/K rows in llama.cpp's rotary order), a Q8_0 tied table, fp32 norms and a byte-level
BPE vocabulary, so that transformers' GGUF loader reads it like any other .gguf."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import quantize

from kiln.models import tiny

PROJECTIONS = {"attn_q": ("self_attn.q_proj", T.Q4_1), "attn_k": ("self_attn.k_proj", T.Q4_1),
               "attn_v": ("self_attn.v_proj", T.Q4_0), "attn_output": ("self_attn.o_proj", T.Q4_1),
               "ffn_gate": ("mlp.gate_proj", T.Q4_1), "ffn_up": ("mlp.up_proj", T.Q8_0),
               "ffn_down": ("mlp.down_proj", T.Q4_1)}


def _rotary_order(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation of Q/K rows (transformers' GGUF loader undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path) -> Path:
    model = tiny.build("tiny-llama")
    cfg = model.config
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                              else 10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = tiny.byte_tokenizer(bert_style=False).get_vocab()
    tokens = [""] * cfg.vocab_size
    for token, i in vocab.items():
        tokens[i] = token
    for i in range(len(vocab), cfg.vocab_size):
        tokens[i] = f"<unused{i}>"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i >= 256 else 1 for i in range(cfg.vocab_size)])
    writer.add_token_scores([0.0] * cfg.vocab_size)  # no merges: a byte-level vocabulary of single bytes
    writer.add_eos_token_id(tiny.EOS)
    writer.add_pad_token_id(tiny.EOS)

    def q(name: str, array: np.ndarray, kind: T) -> None:
        writer.add_tensor(name, quantize(np.ascontiguousarray(array, dtype=np.float32), kind), raw_dtype=kind)

    q("token_embd.weight", state["model.embed_tokens.weight"], T.Q8_0)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[prefix + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[prefix + "post_attention_layernorm.weight"])
        for name, (hf, kind) in PROJECTIONS.items():
            w = state[prefix + hf + ".weight"]
            if name == "attn_q":
                w = _rotary_order(w, cfg.num_attention_heads)
            elif name == "attn_k":
                w = _rotary_order(w, cfg.num_key_value_heads)
            q(f"blk.{i}.{name}.weight", w, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

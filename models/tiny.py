"""Random-init, seeded, few-layer models for tests: tiny-llama, tiny-gpt2, tiny-qwen2, tiny-opt,
tiny-phi3, tiny-gemma, tiny-neox (rotary on half of each head), tiny-bert.

tiny-qwen2 has a different attention layout from tiny-llama (q/k/v projections with
biases, GQA 4/1), and tiny-opt learned positions counted from its attention mask (cumsum,
offset 2), to check that graph passes do not depend on one architecture.

They share a byte-level tokenizer (256 byte tokens plus specials) so that `kiln run`
works on them end to end. Weights use a larger init range than the HF default so that
greedy decoding has clear argmax margins (ties would make parity tests flaky).
"""

from __future__ import annotations

import hashlib
import json

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

VOCAB = 320
EOS, CLS, SEP, PAD = 256, 257, 258, 259

CONFIGS = {
    "tiny-llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=None, eos_token_id=EOS, pad_token_id=EOS)),
    "tiny-gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512,
        initializer_range=0.1, bos_token_id=EOS, eos_token_id=EOS)),
    "tiny-qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.2, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=EOS, pad_token_id=EOS)),
    "tiny-opt": ("OPTConfig", "OPTForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, word_embed_proj_dim=64, init_std=0.2,
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)),
    "tiny-phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=EOS, pad_token_id=EOS)),
    "tiny-gemma": ("GemmaConfig", "GemmaForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512, initializer_range=0.2,
        bos_token_id=None, eos_token_id=EOS, pad_token_id=EOS)),
    "tiny-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, initializer_range=0.2, rotary_pct=0.5,
        bos_token_id=None, eos_token_id=EOS, pad_token_id=EOS)),
    "tiny-bert": ("BertConfig", "BertModel", dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=512, pad_token_id=PAD)),
}


def fingerprint(name: str) -> str:
    return hashlib.sha256(json.dumps(CONFIGS[name], sort_keys=True).encode() + b"seed=0").hexdigest()


def build(name: str):
    import transformers

    config_cls, model_cls, kwargs = CONFIGS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    return model.eval()


def byte_tokenizer(bert_style: bool) -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: _byte_of(c)))}
    vocab.update({"<|endoftext|>": EOS, "[CLS]": CLS, "[SEP]": SEP, "[PAD]": PAD})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(["<|endoftext|>", "[CLS]", "[SEP]", "[PAD]"])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if bert_style:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
        )
    return tok


def _byte_of(ch: str) -> int:
    # ByteLevel maps each byte to a printable char; invert GPT-2's bytes_to_unicode.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if ord(ch) in printable:
        return ord(ch)
    extra = [b for b in range(256) if b not in printable]
    return extra[ord(ch) - 256]

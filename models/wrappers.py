"""Export wrappers: fix each task's I/O signature, which the manifest and runtimes rely on.

- causal-lm:  input_ids[batch, sequence] int64 -> logits[batch, sequence, vocab] float32
- embedding:  input_ids, attention_mask[, token_type_ids] [batch, sequence] int64
              -> embedding[batch, hidden] float32 (pooling over the mask, then optionally L2
              normalisation, as sentence-transformers does)
- sequence-classification: the same inputs -> logits[batch, num_labels] float32
"""

from __future__ import annotations

import inspect

import torch


class CausalLMLogits(torch.nn.Module):
    output_names = ["logits"]

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _takes_token_types(model: torch.nn.Module) -> bool:
    return "token_type_ids" in inspect.signature(model.forward).parameters


class PooledEmbedding(torch.nn.Module):
    """Pooling over the real tokens (`mean`, `cls`: the first token, `max`, `last`: the last real
    token), then optionally L2 normalisation, as sentence-transformers' Pooling and Normalize do."""

    output_names = ["embedding"]

    def __init__(self, model: torch.nn.Module, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        if pooling not in ("mean", "cls", "max", "last"):
            raise ValueError(f"unknown pooling {pooling!r}")
        self.model, self.pooling, self.normalize = model, pooling, normalize
        self.takes_token_types = _takes_token_types(model)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if self.takes_token_types else {}
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "mean":
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
        else:  # the last real token, wherever the padding is
            slots = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            last = (slots * attention_mask).argmax(1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return torch.nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled


class SequenceClassifierLogits(torch.nn.Module):
    """A sequence classifier or cross-encoder: logits [batch, num_labels]."""

    output_names = ["logits"]

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.takes_token_types = _takes_token_types(model)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if self.takes_token_types else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


class LogitsOf(torch.nn.Module):
    """A user's own causal-LM module (input_ids -> logits, or an output with .logits) under the contract's names."""

    output_names = ["logits"]

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids)
        return getattr(out, "logits", out)

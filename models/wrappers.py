"""Export wrappers: fix each task's I/O signature, which the manifest and runtimes rely on.

- causal-lm:  input_ids[batch, sequence] int64 -> logits[batch, sequence, vocab] float32
- embedding:  input_ids, attention_mask, token_type_ids [batch, sequence] int64
              -> embedding[batch, hidden] float32 (mean pooling over the mask, then L2
              normalisation, as sentence-transformers does)
"""

from __future__ import annotations

import torch


class CausalLMLogits(torch.nn.Module):
    output_names = ["logits"]

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class MeanPooledEmbedding(torch.nn.Module):
    output_names = ["embedding"]

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

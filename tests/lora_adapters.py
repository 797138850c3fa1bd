"""Tiny random-init PEFT LoRA adapters for the LoRA tests (compile, runtime and serve)."""

from __future__ import annotations

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(model_name: str, folder, seed: int, **config):
    """A PEFT adapter on a kiln tiny model with random A and B (B nonzero), saved with save_pretrained."""
    import peft
    import torch

    from kiln.models import tiny

    model = tiny.build(model_name)
    torch.manual_seed(seed)
    config = {"r": 4, "lora_alpha": 16, "target_modules": LLAMA_TARGETS, "init_lora_weights": False, **config}
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
    with torch.no_grad():  # PEFT's non-zero init is small; make the adapter change the tokens
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(folder)
    return folder

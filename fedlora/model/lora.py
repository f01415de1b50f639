"""LoRA through peft. The classification head is trained and lives in the flat vector."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from fedlora.config import Config


def add_lora(model: torch.nn.Module, config: Config, default_targets: list[str],
             head: str | None) -> torch.nn.Module:
    """Wrap `model` with LoRA. The caller seeds torch's RNG (the `init` stream) around
    model loading and this call, so the new head and every A are the same on all clients."""
    cfg = config.model
    targets = cfg.target_modules or default_targets
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(
            f"model.target_modules: {missing} not found in the model "
            f"(linear layers include e.g. {sorted(n for n in names if n)[:12]})"
        )
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=[head] if (head and cfg.train_head) else None,
    )
    return get_peft_model(model, lora)

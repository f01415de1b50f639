"""LoRA through peft. The classification head is trained and lives in the flat vector.

`model.trainable` says what the flat vector holds; the engine fills it in from the method
(`fedlora.methods.trainable`), so this module needs no method registry. `backbone`
(full_finetune and the sparse-backbone baselines) gets the bare model with every weight
trainable; `lora+weights` (flora_two_stage, flora_stacking) gets LoRA plus the adapted
weights W of every LoRA-wrapped module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from fedlora.config import Config


def trains_backbone(config: Config) -> bool:
    """Whether the flat vector is the whole backbone (`model.trainable = backbone`)."""
    return config.model.trainable == "backbone"


def trains_target_weights(config: Config) -> bool:
    """Whether the adapted weights W join LoRA in P (`model.trainable = lora+weights`)."""
    return config.model.trainable == "lora+weights"


def add_lora(model: torch.nn.Module, config: Config, default_targets: list[str],
             head: str | None, new: Sequence[str] = ()) -> torch.nn.Module:
    """Wrap `model` with LoRA. The caller seeds torch's RNG (the `init` stream) around
    model loading and this call, so the new head and every A are the same on all clients.

    For a backbone-training method, return `model` unwrapped with *all* parameters
    trainable: embeddings, every layer, norms, biases and the head (the paper's "full
    fine-tuning" is all weights). model.rank/alpha/target_modules/train_head are unused then.
    `new` names modules the checkpoint did not supply (randomly initialized on load, e.g. a
    sentence-transformers checkpoint's missing BERT pooler): like the head, they are not
    pretrained W.
    """
    if trains_backbone(config):
        # The sparse-backbone masks act on the pretrained W; the task's new head and other
        # freshly initialized modules are not W (FlatAdapter.head, methods/backbone.py).
        model.fedlora_head = tuple(dict.fromkeys(m for m in (head, *new) if m))
        return model.requires_grad_(True)
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
    model = get_peft_model(model, lora)
    if trains_target_weights(config):  # W of every LoRA-wrapped module joins the flat vector
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.get_base_layer().weight.requires_grad_(True)
    return model

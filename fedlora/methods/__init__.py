"""Method registry: each method is one small file saying what differs from FLASC's loop."""

from __future__ import annotations

from fedlora.methods.base import Method
from fedlora.methods.flasc import FLASC
from fedlora.methods.lora import LoRA

METHODS: dict[str, type[Method]] = {
    "flasc": FLASC,
    "lora": LoRA,
}


def build_method(cfg, adapter) -> Method:
    return METHODS[cfg.method.name](cfg, adapter)

"""Task registry: name -> builder(config) -> Task."""

from __future__ import annotations

from collections.abc import Callable

from fedlora.tasks import text_file, wordnet

TASKS: dict[str, Callable] = {
    "wordnet-topics": wordnet.build,
    "text-file": text_file.build,
}


def build_task(cfg):
    """Load data, partition it and build the model with LoRA for `cfg.task.name`."""
    return TASKS[cfg.task.name](cfg)

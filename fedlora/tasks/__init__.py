"""Task registry: name -> "module:builder"; builders take a Config and return a Task.

Imports are lazy so that a task's optional dependencies (vision, GGUF) are only
needed when that task is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

TASKS: dict[str, str] = {
    "wordnet-topics": "fedlora.tasks.wordnet:build",
    "text-file": "fedlora.tasks.text_file:build",
    "20news": "fedlora.tasks.newsgroups:build",
    "reddit": "fedlora.tasks.reddit:build_reddit",
    "subreddits": "fedlora.tasks.reddit:build_subreddits",
    "cifar10": "fedlora.tasks.cifar10:build",
    "flair": "fedlora.tasks.flair:build",
    "shakespeare-roles": "fedlora.tasks.shakespeare:build",
    "image-digits": "fedlora.tasks.digits:build",
}


@dataclass(frozen=True)
class TaskDefaults:
    """What a task decides when the config leaves a field null. The backbone default lives
    in each task's builder (`model.name` null); the partition default is one rule for all
    tasks (`fedlora.tasks.base.default_partition`: by user when the data has users)."""

    max_length: int = 32  # tokens per example (text tasks)


# Shakespeare speeches run long (its config's 256); every other text task keeps 32.
DEFAULTS: dict[str, TaskDefaults] = {name: TaskDefaults() for name in TASKS}
DEFAULTS["shakespeare-roles"] = TaskDefaults(max_length=256)


def apply_defaults(cfg) -> None:
    """Fill the task-decided fields of `cfg` that are still null (explicit values win)."""
    if cfg.task.max_length is None:
        cfg.task.max_length = DEFAULTS[cfg.task.name].max_length


def check_name(cfg) -> None:
    """`task.name` must be a registered task (the error lists them)."""
    from fedlora.config import check

    check(cfg.task.name in TASKS, "task.name",
          f"unknown task {cfg.task.name!r} (valid: {', '.join(TASKS)})")


def build_task(cfg):
    """Load data, partition it and build the model for `cfg.task.name`, with what
    `model.trainable` says the flat vector holds (LoRA, the backbone, or LoRA and W)."""
    from fedlora.config import ConfigError

    if cfg.model.trainable is None:  # a backbone method must never silently get LoRA
        raise ConfigError("model.trainable: not resolved; pass the config through "
                          "fedlora.engine.resolve_config first (it fills in what the method "
                          "trains)")
    check_name(cfg)
    apply_defaults(cfg)
    module, fn = TASKS[cfg.task.name].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise ValueError(f"task.name: '{cfg.task.name}' is not available in this build"
                             ) from None
        raise
    task = getattr(mod, fn)(cfg)
    from fedlora.tasks.base import hold_out_local_test

    hold_out_local_test(cfg, task.data)
    return task

"""Task registry: name -> "module:builder"; builders take a Config and return a Task.

Imports are lazy so that a task's optional dependencies (vision, GGUF) are only
needed when that task is used.
"""

from __future__ import annotations

import importlib

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

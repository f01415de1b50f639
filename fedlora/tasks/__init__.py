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


def build_task(cfg):
    """Load data, partition it and build the model with LoRA for `cfg.task.name`."""
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

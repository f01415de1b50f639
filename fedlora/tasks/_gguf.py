"""Load a GGUF checkpoint once, de-quantise it and keep it as an ordinary HF folder.

transformers reads GGUF (`gguf_file=`, with the `gguf` package) by de-quantising every
tensor, which takes seconds to minutes; the float32 result is saved as safetensors plus
config and tokenizer, so later runs load it like any local model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from fedlora.model.backbone import MissingResource, quiet_transformers


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "fedlora"


def is_model_dir(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def dequantized_dir(gguf: Path, cache_dir: str | None) -> Path:
    """The cached HF folder for `gguf`, converting it on first use."""
    out = cache_root(cache_dir) / f"{gguf.stem}-{gguf.stat().st_size}"
    if is_model_dir(out):
        return out
    if importlib.util.find_spec("gguf") is None:
        raise MissingResource(f"reading {gguf.name} needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float32 now; drop the GGUF quantizer so the model saves as is.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)  # atomic: a concurrent conversion either wins or finds it done
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_model_dir(out):
            raise
    return out

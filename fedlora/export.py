"""A run's model in the Hugging Face layout: a peft adapter folder, or a full model.

`PeftModel.from_pretrained(base, folder)` loads what this writes, with peft's own
`adapter_config.json` and `adapter_model.safetensors`:

* LoRA methods: the LoRA factors, plus the trained head through `modules_to_save`. Modules
  the backbone checkpoint lacked (randomly initialized from the run's seed and frozen, e.g. a
  sentence-transformers checkpoint's BERT pooler) join `modules_to_save` too: without them
  a fresh process would draw a different random pooler and score differently.
* Methods that train the backbone (`Method.trains_backbone`) export the whole model with
  `save_pretrained`; so do flora_two_stage / flora_stacking once their adapted weights W have
  left the pretrained ones (W is in P for them): peft can hold W + BA only as a full-rank
  LoRA, so the merged model (W + s BA) is written instead. A two-stage run that ended in Stage
  2 has W = W0 again and exports as a normal adapter.

Beside it: `config.json` (the base model's config with the run's `id2label`/`label2id`), the
tokenizer when the backbone has one, and `fedlora_export.json` (what was exported, from which
round, how the task reads text). The base model is named by the local path or hub id the run
loaded it from (`base_model_name_or_path`).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch

MANIFEST = "fedlora_export.json"
BEST_DIR = "best"  # RUN/best/adapter.safetensors + best.json: the best evaluated round
ADAPTER_FILE = "adapter.safetensors"  # flat layout by parameter name (engine.write_summary)
EXPORT_DIR = "export"  # RUN/export: written at the end of every run


class ExportError(ValueError):
    """A run cannot be exported as asked; the message says why and what to do."""


def run_config(run: str | Path):
    """The resolved Config of a run directory."""
    import yaml

    from fedlora.config import config_from_dict
    from fedlora.resolve import resolve_config

    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{run} is not a run directory (no config.yaml)")
    return resolve_config(config_from_dict(yaml.safe_load(path.read_text())))


def saved_vector(run: str | Path, which: str = "last") -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter tensors by parameter name of the last or best round, and where they came
    from ({"round": t, metric: value})."""
    from safetensors.torch import load_file

    run = Path(run)
    if which == "last":
        path = run / ADAPTER_FILE
        if not path.is_file():
            raise ExportError(f"{run} has no {ADAPTER_FILE}: the run has not finished (finish "
                              f"it with `fedlora resume {run}`)")
        summary = json.loads((run / "summary.json").read_text())
        return load_file(str(path)), {"round": summary["rounds"], **summary.get("final", {})}
    if which == "best":
        path = run / BEST_DIR / ADAPTER_FILE
        if not path.is_file():
            raise ExportError(f"{run} has no {BEST_DIR}/{ADAPTER_FILE} (no round was evaluated "
                              "yet, or the run predates best-round checkpoints); use --round last")
        return load_file(str(path)), json.loads((run / BEST_DIR / "best.json").read_text())
    raise ExportError(f"--round: expected best or last, got {which!r}")


def save_best(out: Path, named: dict[str, torch.Tensor], info: dict) -> None:
    """Keep the best evaluated round's adapter (called by fedlora.hooks after each round)."""
    from safetensors.torch import save_file

    d = Path(out) / BEST_DIR
    d.mkdir(exist_ok=True)
    tmp = d / (ADAPTER_FILE + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in named.items()}, str(tmp))
    tmp.replace(d / ADAPTER_FILE)
    (d / "best.json").write_text(json.dumps(info, indent=2) + "\n")


def _task_kind(task) -> tuple[str, str]:
    """(kind, transformers auto class) of a task object."""
    from fedlora.tasks._text2text import TextToTextClassification
    from fedlora.tasks.lm import CausalLM
    from fedlora.tasks.text import TextClassification

    if isinstance(task, TextClassification):
        return "classification", "AutoModelForSequenceClassification"
    if isinstance(task, TextToTextClassification):
        return "text_to_text", "AutoModelForCausalLM"
    if isinstance(task, CausalLM):
        return "causal_lm", "AutoModelForCausalLM"
    return "image", "AutoModelForImageClassification"


def export_task(task, cfg, named: dict[str, torch.Tensor], out: str | Path, *,
                source: dict, initial: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `named` (adapter tensors by parameter name) on `task`'s model as a HF folder.

    `initial` holds the trainable tensors before training (to tell whether W moved, for the
    methods that hold W in P); the model's own values are restored afterwards, so a live
    run's model is left as it was.
    """
    from fedlora.model.lora import trains_backbone, trains_target_weights
    from fedlora.tasks._text2text import SEP

    out = Path(out)
    model = task.model
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(trainable - set(named))
    if missing:
        raise ExportError(f"the saved adapter lacks {len(missing)} of the model's trainable "
                          f"tensors (e.g. {missing[0]}): it was made with another config")
    before = {n: params[n].detach().clone() for n in trainable}
    if initial is None:
        initial = before
    kind, auto_class = _task_kind(task)
    try:
        with torch.no_grad():
            for n in trainable:
                params[n].copy_(named[n].to(params[n].device, params[n].dtype))
        moved = [n for n in trainable if n.endswith(".base_layer.weight")
                 and not torch.equal(params[n], initial[n].to(params[n].device))]
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        full = trains_backbone(cfg) or (trains_target_weights(cfg) and bool(moved))
        if full:
            fmt = _save_full(model, out)
            note = ("the method trains the backbone: the whole model, save_pretrained"
                    if trains_backbone(cfg) else
                    f"{cfg.method.name} moved the adapted weights W ({len(moved)} tensors) off "
                    "the pretrained ones; W + s*BA merged into a full model, save_pretrained")
        else:
            fmt = _save_adapter(model, out, getattr(task, "new_modules", ()))
            note = "LoRA adapter; the head and any non-pretrained modules via modules_to_save"
    finally:
        with torch.no_grad():
            for n in trainable:
                params[n].copy_(before[n])
    base = getattr(model, "peft_config", {}).get("default")
    names = list(task.data.label_names)
    manifest: dict[str, Any] = {
        "format": 1, "export": fmt, "note": note, "kind": kind, "auto_class": auto_class,
        "task": cfg.task.name, "method": cfg.method.name,
        "base_model": base.base_model_name_or_path if base is not None
        else getattr(getattr(model, "config", None), "_name_or_path", None),
        "utility": task.utility, "higher_is_better": getattr(task, "higher_is_better", True),
        "label_names": names, "max_length": cfg.task.max_length,
        "text_column": cfg.task.text_column, "label_column": cfg.task.label_column,
        "source": source,
    }
    if kind == "text_to_text":
        manifest["prompt_separator"] = SEP
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    tok = getattr(task, "tokenizer", None)
    if tok is not None:
        tok.save_pretrained(out)
    return out


def _save_adapter(model, out: Path, new_modules: tuple[str, ...]) -> str:
    """peft's own save, plus the non-pretrained frozen modules as modules_to_save."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    if not isinstance(model, PeftModel):
        raise ExportError("the model has no peft adapter to export")
    model.save_pretrained(out, safe_serialization=True)
    base = model.get_base_model()
    if new_modules:
        cfg_path = out / "adapter_config.json"
        conf = json.loads(cfg_path.read_text())
        conf["modules_to_save"] = list(dict.fromkeys([*(conf.get("modules_to_save") or []),
                                                      *new_modules]))
        cfg_path.write_text(json.dumps(conf, indent=2, sort_keys=True))
        weights = out / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        for m in new_modules:
            for k, v in base.get_submodule(m).state_dict().items():
                tensors[f"base_model.model.{m}.{k}"] = v.detach().cpu().contiguous()
        save_file(tensors, str(weights), metadata={"format": "pt"})
    if hasattr(base, "config") and hasattr(base.config, "save_pretrained"):
        base.config.save_pretrained(out)  # id2label / label2id / num_labels
    return "peft_adapter"


def _save_full(model, out: Path) -> str:
    """The whole model: merged first when it is a peft model (W + s*BA, trained head)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):  # once per export, on a copy: merging in place would
        model = copy.deepcopy(model).merge_and_unload()  # change the resident model's W
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(out, safe_serialization=True)
    else:  # a non-transformers backbone (EfficientNet-Lite0): its state dict
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(out / "model.safetensors"))
    return "full_model"


def export(run: str | Path, out: str | Path | None = None, *, which: str = "last",
           task=None) -> Path:
    """Export run directory `run` (its last or best round) to `out` (default RUN/export or
    RUN/export-best). Rebuilds the run's task from config.yaml unless one is given."""
    run = Path(run)
    cfg = run_config(run)
    named, source = saved_vector(run, which)
    if out is None:
        out = run / (EXPORT_DIR if which == "last" else f"{EXPORT_DIR}-best")
    if task is None:
        from fedlora.model.backbone import quiet_transformers
        from fedlora.tasks import build_task

        quiet_transformers()
        task = build_task(cfg)
    return export_task(task, cfg, named, out, source={"run": str(run), "round_kind": which,
                                                     **source})


def load_exported(folder: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer or None, manifest) of an export folder, through transformers and
    peft only; what `fedlora predict` uses."""
    import transformers
    from transformers import AutoConfig

    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise ExportError(f"{folder} is not a fedlora export (no {MANIFEST}); run "
                          f"`fedlora export RUN --out {folder}` first")
    manifest = json.loads(mpath.read_text())
    auto = getattr(transformers, manifest["auto_class"])
    if manifest["export"] == "peft_adapter":
        from peft import PeftModel

        config = AutoConfig.from_pretrained(folder)
        base = auto.from_pretrained(manifest["base_model"], config=config)
        model = PeftModel.from_pretrained(base, folder)
    else:
        model = auto.from_pretrained(folder)
    tok = None
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok, manifest

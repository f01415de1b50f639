"""Use a trained run: predictions on new text (`fedlora predict`) and the task's metrics on new
labelled data (`fedlora eval`).

`predict` runs the exported model (`fedlora.export`) through transformers and peft alone, as
a user's own code would: label and probability for classification, perplexity (or generated
text) for next-token tasks. `evaluate` rebuilds the run's task and scores the new data with
the task's own `evaluate`, so its numbers mean exactly what the run's metrics.jsonl means.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedlora.export import EXPORT_DIR, MANIFEST, ExportError, load_exported


def read_inputs(path: str, text_column: str, label_column: str | None = None,
                split: str | None = None, field: str = "--input"):
    """A DataFrame of the rows to use: a JSONL/JSON/CSV/Parquet file, a `datasets` folder
    (`split`, default its test split) or `-` (stdin, one text per line)."""
    import pandas as pd

    from fedlora.tasks.hf_datasets import (
        TEST_SPLITS,
        hub_name_error,
        is_dataset_folder,
        read_dataset_folder,
    )

    if path == "-":
        lines = [ln.rstrip("\n") for ln in sys.stdin if ln.strip()]
        df = pd.DataFrame({text_column: lines})
        where = "stdin"
    elif is_dataset_folder(path):
        if split is None and (Path(path) / "dataset_dict.json").is_file():
            splits = json.loads((Path(path) / "dataset_dict.json").read_text())["splits"]
            split = next((s for s in TEST_SPLITS if s in splits), None)
            if split is None:
                raise ValueError(f"--split: {path} has splits {splits}; name the one to use")
        df, _ = read_dataset_folder(path, split, field)
        where = f"{path} (split {split})" if split else str(path)
    else:
        p = Path(path).expanduser()
        if not p.exists():
            if p.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"):
                raise ValueError(f"{field}: file not found: {p}")
            raise hub_name_error(path, field)
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".json"):
            df = pd.read_json(p, lines=suffix == ".jsonl") if p.stat().st_size else pd.DataFrame()
        elif suffix == ".csv":
            try:
                df = pd.read_csv(p)
            except pd.errors.EmptyDataError:
                df = pd.DataFrame()
        elif suffix == ".parquet":
            df = pd.read_parquet(p)
        else:
            raise ValueError(f"{field}: unsupported file type '{p.suffix}' (valid: .jsonl, "
                             ".json, .csv, .parquet, a datasets folder, or - for stdin)")
        where = str(p)
    if len(df) == 0:
        raise ValueError(f"{field}: {where} has no rows")
    for col, opt in ((text_column, "--text-column"), (label_column, "--label-column")):
        if col is not None and col not in df.columns:
            raise ValueError(f"{field}: {where} has no column {col!r} (columns: "
                             f"{list(df.columns)}); name the right one with {opt}")
        if col is not None and df[col].isna().any():
            row = int(np.flatnonzero(df[col].isna().to_numpy())[0])
            raise ValueError(f"{field}: {where} row {row} has an empty {col!r}")
    return df


def export_folder(source: str | Path, which: str = "last") -> Path:
    """An export folder from a run directory (exported on first use) or an export itself."""
    p = Path(source)
    if (p / MANIFEST).is_file():
        return p
    if (p / "config.yaml").is_file():
        folder = p / (EXPORT_DIR if which == "last" else f"{EXPORT_DIR}-best")
        if not (folder / MANIFEST).is_file():
            from fedlora.export import export

            export(p, folder, which=which)
        return folder
    raise ExportError(f"{source} is neither a run directory (config.yaml) nor an export "
                      f"folder ({MANIFEST})")


class Predictor:
    """An exported model ready to predict, loaded with transformers + peft."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        self.device = torch.device(device)
        self.model, self.tok, self.manifest = load_exported(folder, self.device)
        self.kind = self.manifest["kind"]
        if self.kind == "image":
            raise ExportError("predict reads text; this run is an image task (use the exported "
                              "folder with transformers' image pipeline)")
        self.max_length = int(self.manifest["max_length"])
        self.names = self.manifest["label_names"]

    def _start(self) -> list[int]:
        first = self.tok.bos_token_id if self.tok.bos_token_id is not None \
            else self.tok.eos_token_id
        return [first] if first is not None else []

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def predict(self, texts: list[str], batch_size: int = 32,
                generate: int = 0) -> list[dict[str, Any]]:
        """One dict per text: label + probability (+ every label's probability) for
        classification, perplexity (and `generated` with generate > 0) for next-token tasks."""
        out: list[dict[str, Any]] = []
        for start in range(0, len(texts), batch_size):
            chunk = [str(t) for t in texts[start:start + batch_size]]
            if self.kind == "classification":
                enc = self.tok(chunk, truncation=True, max_length=self.max_length,
                               padding=True, return_tensors="pt").to(self.device)
                probs = self.model(**enc).logits.float().softmax(-1)
            elif self.kind == "text_to_text":
                probs = self._label_scores(chunk).softmax(-1)
            else:
                out.extend(self._lm(chunk, generate))
                continue
            for p in probs.cpu():
                k = int(p.argmax())
                out.append({"label": self.names[k], "probability": float(p[k]),
                            "probabilities": {n: float(x) for n, x in zip(self.names, p)}})
        return out

    def _label_scores(self, texts: list[str]) -> torch.Tensor:
        """log p(" label" EOS | <start> text SEP) per text and label, one pass per label."""
        tok, sep = self.tok, self.tok(self.manifest["prompt_separator"],
                                      add_special_tokens=False)["input_ids"]
        labels = [tok(" " + n, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                  for n in self.names]
        room = self.max_length - len(self._start()) - len(sep) - max(len(r) for r in labels)
        enc = tok(texts, add_special_tokens=False, truncation=True,
                  max_length=max(room, 1))["input_ids"]
        prompts = [self._start() + list(r) + sep for r in enc]
        scores = torch.zeros(len(texts), len(labels))
        for j, lab in enumerate(labels):
            ids, mask = self._pad([p + lab for p in prompts])
            logp = self.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            for i, p in enumerate(prompts):
                pos = torch.arange(len(p) - 1, len(p) - 1 + len(lab))
                scores[i, j] = logp[i, pos, torch.tensor(lab)].sum().cpu()
        return scores

    def _lm(self, texts: list[str], generate: int) -> list[dict[str, Any]]:
        start = self._start()
        enc = self.tok(texts, add_special_tokens=False, truncation=True,
                       max_length=self.max_length - len(start))["input_ids"]
        rows = [start + list(r) for r in enc]
        ids, mask = self._pad(rows)
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100,
                             reduction="none").sum(1)
        n = (target != -100).sum(1).clamp(min=1)
        res = [{"perplexity": math.exp(min(float(c / k), 700.0)), "tokens": int(k)}
               for c, k in zip(ce.cpu(), n.cpu())]
        if generate > 0:
            for r, row in zip(res, rows):
                x = torch.tensor([row], device=self.device)
                g = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                        max_new_tokens=generate, do_sample=False,
                                        pad_token_id=self.tok.pad_token_id)
                r["generated"] = self.tok.decode(g[0, len(row):], skip_special_tokens=True)
        return res


def predict(source: str | Path, input_path: str, *, output: str | Path | None = None,
            text_column: str | None = None, split: str | None = None, batch_size: int = 32,
            generate: int = 0, which: str = "last", device: str = "cpu") -> list[dict]:
    """Predict every row of `input_path`; writes JSONL to `output` when given (the input's
    text plus the prediction), and returns the rows."""
    folder = export_folder(source, which)
    predictor = Predictor(folder, device)
    col = text_column or predictor.manifest.get("text_column", "text")
    df = read_inputs(input_path, col, split=split)
    texts = df[col].astype(str).tolist()
    preds = predictor.predict(texts, batch_size, generate)
    rows = [{col: t, **p} for t, p in zip(texts, preds)]
    if output is not None:
        Path(output).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def evaluate(run: str | Path, data: str, *, split: str | None = None, which: str = "last",
             text_column: str | None = None, label_column: str | None = None,
             batch_size: int | None = None) -> dict[str, float]:
    """The run's task metrics (as in metrics.jsonl) of its last/best model on new data."""
    from fedlora.export import run_config, saved_vector
    from fedlora.model.backbone import quiet_transformers
    from fedlora.tasks import build_task

    quiet_transformers()
    run = Path(run)
    cfg = run_config(run)
    named, _ = saved_vector(run, which)
    task = build_task(cfg)
    text = text_column or cfg.task.text_column
    label = label_column or cfg.task.label_column
    label = _needs_labels(task, label)
    split_ = new_split(task, cfg.task.max_length,
                       read_inputs(data, text, label, split, "--data"), text, label, data)
    params = dict(task.model.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            if p.requires_grad:
                p.copy_(named[n].to(p.device, p.dtype))
    device = next(task.model.parameters()).device
    return task.evaluate(task.model, split_, batch_size or cfg.eval_batch_size, device)


def _needs_labels(task, label: str) -> str | None:
    from fedlora.tasks.lm import CausalLM

    return None if isinstance(task, CausalLM) else label


def new_split(task, max_length: int, df, text: str, label: str | None, where: str):
    """New data encoded exactly as the task encodes its own test split."""
    from fedlora.data.federated import Split
    from fedlora.tasks._text2text import TextToTextClassification
    from fedlora.tasks._text_common import pack
    from fedlora.tasks.lm import CausalLM, encode
    from fedlora.tasks.text import TextClassification, tokenize

    texts = df[text].astype(str).tolist()
    if isinstance(task, CausalLM):
        rows = [r for r in encode(task.tokenizer, texts, max_length) if len(r) >= 2]
        if not rows:
            raise ValueError(f"--data: no text in {where} has a token to predict")
        ids, lengths = pack(rows, task.tokenizer.pad_token_id)
        return Split({"input_ids": torch.from_numpy(ids), "lengths": torch.from_numpy(lengths)},
                     torch.zeros(len(rows), dtype=torch.int64))
    names = list(task.data.label_names)
    index = {n: i for i, n in enumerate(names)}
    raw = [str(x) for x in df[label].tolist()]
    unseen = sorted({x for x in raw if x not in index})
    if unseen:
        row = next(i for i, x in enumerate(raw) if x in unseen)
        raise ValueError(f"--data: {where} row {row} has label {unseen[0]!r}, which the model "
                         f"never saw in training ({len(unseen)} unseen label(s); known: {names})")
    labels = torch.tensor([index[x] for x in raw], dtype=torch.int64)
    if isinstance(task, TextClassification):
        return Split(tokenize(task.tokenizer, texts, max_length), labels)
    if isinstance(task, TextToTextClassification):
        ids, lengths = task.encode_prompts(texts)
        return Split({"input_ids": torch.from_numpy(ids), "lengths": torch.from_numpy(lengths)},
                     labels)
    raise ValueError(f"eval reads text; task '{task.name}' is not a text task")


"""Image classification, single- or multi-label, with any image backbone plus peft LoRA.

A loader returns `ImageExamples` (uint8 pixels in memory, or one file per example
for datasets too large to hold); a backbone says how to build the model, which
layers get LoRA, which head is trained, and how to normalise. The task does the
rest: split, partition, per-batch transforms, loss and metrics.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedlora.config import Config
from fedlora.data.federated import FederatedData, Split
from fedlora.data.partition import empty_clients
from fedlora.model.backbone import quiet_transformers
from fedlora.model.lora import add_lora
from fedlora.rng import torch_seed
from fedlora.tasks._img import Preprocess, decode
from fedlora.tasks.base import default_partition, partition_clients, train_test

# LoRA targets for transformers image models: the reference FLASC code adapts
# query and value (the paper's B.3 says K,V; we follow the code). transformers 5
# names them q_proj/v_proj (it renames old checkpoints on load), 4.x query/value.
# Override with model.target_modules.
HF_TARGETS = (["q_proj", "v_proj"], ["query", "value"])


@dataclass
class ImageExamples:
    """What an image loader returns, before splitting and partitioning."""

    labels: np.ndarray  # int64 (N,) class ids, or float32 (N, K) multi-hot
    label_names: list[str]  # index -> name, fixed by the loader (deterministic)
    images: torch.Tensor | None = None  # uint8 (N, C, H, W) at native size, C in {1, 3}
    files: list[Path] | None = None  # or: one encoded image per example, read per batch
    clients: list[str] | None = None  # natural partition key per example
    is_test: np.ndarray | None = None  # the dataset's official split, when it has one

    def __post_init__(self) -> None:
        if (self.images is None) == (self.files is None):
            raise ValueError("ImageExamples needs exactly one of images or files")
        n = len(self.images) if self.images is not None else len(self.files)
        if len(self.labels) != n:
            raise ValueError(f"{n} images but {len(self.labels)} labels")
        if self.clients is not None and len(self.clients) != n:
            raise ValueError(f"{n} images but {len(self.clients)} client ids")
        if self.images is not None and (self.images.dtype != torch.uint8
                                        or self.images.ndim != 4
                                        or self.images.shape[1] not in (1, 3)):
            raise ValueError("images must be uint8 (N, C, H, W) with C = 1 or 3, got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")


@dataclass
class ImageBackbone:
    """How to build and call one model family."""

    build: Callable[[list[str], bool], torch.nn.Module]  # (label names, multi_label) -> model
    targets: tuple[list[str], ...]  # default LoRA targets: the first set the model has
    head: str  # the new classification head, trained and kept in P
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_size: int  # the resolution it was pretrained at
    hf: bool = True  # call as model(pixel_values=...).logits rather than model(x)
    resizable: bool = False  # runs at other resolutions (ViT: interpolated positions)


def _triple(v) -> tuple[float, float, float]:
    """A per-channel (R, G, B) value from a processor config's scalar or list."""
    v = [float(x) for x in (v if isinstance(v, list | tuple) else [v])]
    return (v[0], v[0], v[0]) if len(v) == 1 else (v[0], v[1], v[2])


def hf_backbone(path: str) -> ImageBackbone:
    """A transformers image classifier from a local folder, normalised as its own
    preprocessor config says (0.5 mean/std when it has none)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    quiet_transformers()
    config = AutoConfig.from_pretrained(path)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    proc = Path(path) / "preprocessor_config.json"
    if proc.is_file():
        p = json.loads(proc.read_text())
        if p.get("do_normalize", True):
            mean, std = _triple(p.get("image_mean", mean)), _triple(p.get("image_std", std))
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def build(names: list[str], multi_label: bool) -> torch.nn.Module:
        return AutoModelForImageClassification.from_pretrained(
            path, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True,
            problem_type="multi_label_classification" if multi_label
            else "single_label_classification",
        )

    try:  # ViT-style models take interpolate_pos_encoding and so run at any resolution
        model_cls = AutoModelForImageClassification._model_mapping[type(config)]
        resizable = "interpolate_pos_encoding" in inspect.signature(model_cls.forward).parameters
    except (KeyError, AttributeError):
        resizable = False
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, int) else size[0]
    return ImageBackbone(build, HF_TARGETS, "classifier", mean, std, int(size), hf=True,
                         resizable=resizable)


class ImageClassification:
    """An image task: data, model and metrics for one config.

    Single-label: cross-entropy, `accuracy`. Multi-label (labels are multi-hot):
    per-label sigmoid + BCE, threshold 0.5, utility `micro_f1`.
    """

    def __init__(self, cfg: Config, examples: ImageExamples, backbone: ImageBackbone,
                 device: torch.device, *, flip: bool = True):
        self.name = cfg.task.name
        self.backbone = backbone
        self.multi_label = examples.labels.ndim == 2
        self.utility = "micro_f1" if self.multi_label else "accuracy"
        t = cfg.task
        default_partition(cfg, examples.clients is not None, not self.multi_label)
        if self.multi_label and t.partition == "dirichlet":
            raise ValueError(f"task.partition: '{t.name}' is multi-label; Dirichlet label skew "
                             "needs one label per example (use natural, iid or iid_mix)")
        if t.image_size != backbone.native_size and not backbone.resizable:
            raise ValueError(f"task.image_size: {t.image_size} differs from the model's "
                             f"{backbone.native_size} and this model cannot change resolution")
        labels = examples.labels
        train_idx, test_idx = train_test(cfg, len(labels),
                                          None if self.multi_label else labels, examples.is_test)
        clients = None if examples.clients is None else [examples.clients[i] for i in train_idx]
        part_labels = labels[train_idx] if not self.multi_label else np.zeros(len(train_idx))
        parts, client_names = partition_clients(cfg, part_labels, clients, cfg.seed)

        self.files = examples.files
        self._pool: ThreadPoolExecutor | None = None
        self.preprocess = Preprocess(t.image_size, backbone.mean, backbone.std, flip=flip)
        self.interpolate = t.image_size != backbone.native_size
        label_tensor = torch.from_numpy(labels.astype(np.float32 if self.multi_label
                                                      else np.int64))

        def split(idx: np.ndarray) -> Split:
            idx_t = torch.from_numpy(idx)
            if examples.images is not None:
                inputs = {"pixels": examples.images[idx_t]}
            else:
                inputs = {"file": idx_t.clone()}  # into self.files
            return Split(inputs, label_tensor[idx_t])

        self.data = FederatedData(
            train=split(train_idx), test=split(test_idx), clients=parts,
            client_names=client_names, label_names=list(examples.label_names),
            empty_clients=empty_clients(parts),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed(cfg.seed, "init"))
            model = backbone.build(list(examples.label_names), self.multi_label)
            names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
            targets = next((ts for ts in backbone.targets if set(ts) <= names),
                           backbone.targets[0])
            self.model = add_lora(model, cfg, targets, backbone.head).to(device)

    # ------------------------------------------------------------------ batches

    def pixels(self, split: Split, idx: np.ndarray) -> torch.Tensor:
        """uint8 (B, C, H, W) for these examples, decoded from disk for file-backed data."""
        idx_t = torch.as_tensor(idx)
        if "pixels" in split.inputs:
            return split.inputs["pixels"][idx_t]
        size, files = self.preprocess.size, self.files or []
        paths = [files[int(i)] for i in split.inputs["file"][idx_t]]
        if self._pool is None:  # PIL decodes with the GIL released: threads overlap
            self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        return torch.from_numpy(np.stack(list(self._pool.map(lambda f: decode(f, size),
                                                             paths))))

    def batch(self, split: Split, idx: np.ndarray, device: torch.device, train: bool,
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        x = self.preprocess(self.pixels(split, idx).to(device), train, generator)
        return {"pixel_values": x, "labels": split.labels[torch.as_tensor(idx)].to(device)}

    def logits(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.backbone.hf:
            return model(pixel_values)
        kw = {"interpolate_pos_encoding": True} if self.interpolate else {}
        return model(pixel_values=pixel_values, **kw).logits

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits.float(), labels, reduction=reduction)
        return F.cross_entropy(logits.float(), labels, reduction=reduction)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._loss(self.logits(model, batch["pixel_values"]), batch["labels"], "mean")

    # ------------------------------------------------------------------ metrics

    @torch.inference_mode()
    def evaluate(self, model: torch.nn.Module, split: Split, batch_size: int,
                 device: torch.device) -> dict[str, float]:
        model.eval()
        n = len(split)
        loss_sum, correct = 0.0, 0
        k = len(self.data.label_names)
        tp, fp, fn = (torch.zeros(k, dtype=torch.float64) for _ in range(3))
        for start in range(0, n, batch_size):
            b = self.batch(split, np.arange(start, min(start + batch_size, n)), device, False)
            logits = self.logits(model, b["pixel_values"]).float()
            y = b["labels"]
            if self.multi_label:
                loss_sum += float(self._loss(logits, y, "sum")) / k  # mean over labels
                pred = (logits > 0).double().cpu()
                y = y.double().cpu()
                tp += (pred * y).sum(0)
                fp += (pred * (1 - y)).sum(0)
                fn += ((1 - pred) * y).sum(0)
            else:
                loss_sum += float(self._loss(logits, y, "sum"))
                correct += int((logits.argmax(-1) == y).sum())
        if not self.multi_label:
            return {"accuracy": correct / n, "loss": loss_sum / n}
        return {**multilabel_metrics(tp, fp, fn), "loss": loss_sum / n}


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b with 0 where b == 0 (tf.math.divide_no_nan, as FLAIR's metrics do)."""
    return torch.where(b > 0, a / b.clamp(min=1e-300), torch.zeros_like(a))


def multilabel_metrics(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> dict[str, float]:
    """Micro and macro precision, recall and F1 at threshold 0.5, from per-label counts.

    Macro F1 follows FLAIR's benchmark (`flair_metrics.F1`): the harmonic mean of
    the macro-averaged precision and recall. Micro precision is what the reference
    FLASC code logged as "accuracy"; it is reported under its own name here.
    """
    t, p, n = tp.sum(), fp.sum(), fn.sum()
    micro_p, micro_r = _div(t, t + p), _div(t, t + n)
    macro_p, macro_r = _div(tp, tp + fp).mean(), _div(tp, tp + fn).mean()
    return {
        "micro_f1": float(_div(2 * t, 2 * t + p + n)),
        "macro_f1": float(_div(2 * macro_p * macro_r, macro_p + macro_r)),
        "micro_precision": float(micro_p),
        "micro_recall": float(micro_r),
        "macro_precision": float(macro_p),
        "macro_recall": float(macro_r),
    }

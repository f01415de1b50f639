"""`flair`: FLAIR (Song et al., 2022) with ViT-B/16, 17 coarse labels, multi-label.

Reads the layout ml-flair's `download_dataset.py` writes:

    dataset_dir/
      labels_and_metadata.json   # list of {image_id, user_id, partition, labels,
                                 #          fine_grained_labels}
      label_relationship.txt     # "fine_grained_label -> label" lines (optional here)
      small_images/<image_id>.jpg

Clients are Flickr users (the natural partition); `partition` gives the official
split: `train` trains, `test` evaluates, `dev`/`val` is not used. Label indices
are the sorted coarse label names, as ml-flair's `label_to_index.json`. The
345k images are decoded per batch from disk, never all held in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedlora.config import Config
from fedlora.model.backbone import MissingResource, resolve
from fedlora.tasks.base import resolve_device
from fedlora.tasks.cifar10 import VIT
from fedlora.tasks.vision import ImageClassification, ImageExamples, hf_backbone

IMAGE_DIRS = ("small_images", "images", "raw_images")
HELP = ("set task.path to a FLAIR dataset folder (from ml-flair's download_dataset.py) holding "
        "labels_and_metadata.json and small_images/<image_id>.jpg")


def coarse_names(root: Path, records: list[dict]) -> list[str]:
    """The coarse label set: from label_relationship.txt when present (all 17 even if a
    subset of the data lacks some), else the labels that occur; sorted by name."""
    rel = root / "label_relationship.txt"
    if rel.is_file():
        names = set()
        for i, line in enumerate(rel.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if "->" not in line:
                raise ValueError(f"task.path: {rel} line {i}: expected 'fine -> coarse', "
                                 f"got {line!r}")
            names.add(line.split("->", 1)[1].strip())
        return sorted(names)
    return sorted({str(label) for r in records for label in r["labels"]})


def load_examples(path: str | None) -> ImageExamples:
    if not path:
        raise MissingResource(f"task.path: flair reads local data; {HELP}")
    root = Path(path).expanduser()
    meta = root / "labels_and_metadata.json"
    if not meta.is_file():
        raise MissingResource(f"task.path: {meta} not found; {HELP}")
    records = json.loads(meta.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"task.path: {meta} must hold a list of image records")
    for i, r in enumerate(records):
        missing = [k for k in ("image_id", "user_id", "partition", "labels")
                   if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"task.path: {meta} record {i} lacks {missing}")
    image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), root)
    names = coarse_names(root, records)
    index = {n: i for i, n in enumerate(names)}
    keep = [r for r in records if r["partition"] in ("train", "test")]
    if not keep:
        raise ValueError(f"task.path: {meta} has no records in partition train or test")
    labels = np.zeros((len(keep), len(names)), dtype=np.float32)
    for i, r in enumerate(keep):
        for label in r["labels"]:
            if str(label) not in index:
                raise ValueError(f"task.path: image {r['image_id']} has label {label!r}, "
                                 f"not among the coarse labels {names}")
            labels[i, index[str(label)]] = 1.0
    files = [image_dir / f"{r['image_id']}.jpg" for r in keep]
    absent = [f for f in files if not f.is_file()]
    if absent:
        raise MissingResource(f"task.path: {len(absent)} of {len(files)} images are missing, "
                              f"e.g. {absent[0]}; {HELP}")
    return ImageExamples(labels=labels, label_names=names, files=files,
                         clients=[str(r["user_id"]) for r in keep],
                         is_test=np.array([r["partition"] == "test" for r in keep]))


def build(cfg: Config) -> ImageClassification:
    backbone = hf_backbone(resolve(cfg.model.name or VIT, None))
    return ImageClassification(cfg, load_examples(cfg.task.path), backbone,
                               resolve_device(cfg.device))

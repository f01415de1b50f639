"""`cifar10`: CIFAR-10 with ViT-B/16 (paper: 500 clients, Dirichlet alpha = 0.1).

Reads three layouts, never a pickle:
* the binary distribution: `cifar-10-batches-bin/` (or `cifar-10-binary.tar.gz`
  itself) with `data_batch_{1..5}.bin`, `test_batch.bin`, `batches.meta.txt`;
  each record is 1 label byte + 3072 pixel bytes (R, G, B planes, 32x32);
* an image folder: `train/<class>/*.png` and `test/<class>/*.png`;
* Parquet: an image column (HF datasets' `{"bytes": ...}` struct or raw bytes)
  and a label column; files are split by `train`/`test` in their path;
* a Hugging Face `datasets` folder (`save_to_disk`), the same columns: a DatasetDict's
  train and test splits, or `task.split` alone (then `task.test_size` is held out).
The Python-pickle distribution (`cifar-10-batches-py`) is refused: unpickling
runs arbitrary code.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np

from fedlora.config import Config
from fedlora.model.backbone import MissingResource, resolve
from fedlora.tasks._img import decode, stack
from fedlora.tasks.base import label_map, resolve_device
from fedlora.tasks.hf_datasets import arrow_splits, is_dataset_folder
from fedlora.tasks.vision import ImageClassification, ImageExamples, hf_backbone

VIT = "google/vit-base-patch16-224-in21k"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]  # the official index order (also alphabetical)
RECORD = 1 + 3 * 32 * 32
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
HELP = ("set task.path to the CIFAR-10 binary version (the folder cifar-10-batches-bin from "
        "cifar-10-binary.tar.gz, or that archive), an image folder with train/<class>/*.png "
        "and test/<class>/*.png, or Parquet files with image and label columns")


def load_examples(path: str | None, size: int = 224, split: str | None = None) -> ImageExamples:
    """CIFAR-10 from whichever supported layout `path` holds; the official test split."""
    if not path:
        raise MissingResource(f"task.path: cifar10 reads local data; {HELP}")
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingResource(f"task.path: {p} does not exist; {HELP}")
    if p.is_file():
        if p.name.endswith((".tar.gz", ".tgz", ".tar")):
            return _binary_tar(p)
        if p.suffix == ".parquet":
            return _parquet([p], size)
        _refuse_pickle(p)
        raise ValueError(f"task.path: cannot read {p}; {HELP}")
    if is_dataset_folder(p):  # `datasets` save_to_disk (e.g. load_dataset("cifar10"))
        return _tables(arrow_splits(p, split), size)
    for d in (p / "cifar-10-batches-bin", p):
        if (d / TRAIN_FILES[0]).is_file():
            return _binary_dir(d)
    _refuse_pickle(p)
    if (p / "train").is_dir() and (p / "test").is_dir():
        return _folder(p, size)
    parquet = sorted(p.rglob("*.parquet"))
    if parquet:
        return _parquet(parquet, size)
    raise MissingResource(f"task.path: {p} holds no CIFAR-10 data in a supported layout; {HELP}")


def _refuse_pickle(p: Path) -> None:
    pickled = (p.name in ("cifar-10-batches-py", "cifar-10-python.tar.gz")
               or (p / "cifar-10-batches-py").is_dir()
               or (p.is_dir() and (p / "data_batch_1").is_file())
               or (p.is_file() and p.name.startswith(("data_batch_", "test_batch"))
                   and not p.suffix))
    if pickled:
        raise ValueError(f"task.path: {p} is the Python-pickle CIFAR-10 distribution, which "
                         "fedlora never unpickles (it can run arbitrary code). Use the binary "
                         "version instead: cifar-10-binary.tar.gz (folder cifar-10-batches-bin)")


def _records(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    if len(data) == 0 or len(data) % RECORD:
        raise ValueError(f"task.path: {name} has {len(data)} bytes, not a whole number of "
                         f"{RECORD}-byte CIFAR-10 records")
    arr = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD)
    labels = arr[:, 0].astype(np.int64)
    if labels.max() >= len(CLASSES):
        raise ValueError(f"task.path: {name} has label {labels.max()} (CIFAR-10 has 0..9)")
    return labels, arr[:, 1:].reshape(-1, 3, 32, 32)


def _meta_names(text: str | None, name: str) -> list[str]:
    if text is None:
        return list(CLASSES)
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != len(CLASSES):
        raise ValueError(f"task.path: {name} lists {len(names)} class names, expected 10")
    return names


def _assemble(parts: dict[str, bytes | None], where: str) -> ImageExamples:
    import torch

    labels, images, is_test = [], [], []
    for fname in [*TRAIN_FILES, "test_batch.bin"]:
        data = parts.get(fname)
        if data is None:
            raise MissingResource(f"task.path: {where} lacks {fname}; {HELP}")
        y, x = _records(data, f"{where}/{fname}")
        labels.append(y)
        images.append(x)
        is_test.append(np.full(len(y), fname == "test_batch.bin"))
    meta = parts.get("batches.meta.txt")
    names = _meta_names(None if meta is None else meta.decode("utf-8", "replace"),
                        f"{where}/batches.meta.txt")
    return ImageExamples(labels=np.concatenate(labels), label_names=names,
                         images=torch.from_numpy(np.concatenate(images)),
                         is_test=np.concatenate(is_test))


def _binary_dir(d: Path) -> ImageExamples:
    wanted = [*TRAIN_FILES, "test_batch.bin", "batches.meta.txt"]
    return _assemble({f: (d / f).read_bytes() for f in wanted if (d / f).is_file()}, str(d))


def _binary_tar(p: Path) -> ImageExamples:
    """Read the binary archive in place (no extraction): members are plain bytes."""
    if "python" in p.name:
        _refuse_pickle(p)
    parts: dict[str, bytes | None] = {}
    with tarfile.open(p) as tar:
        for m in tar:
            base = Path(m.name).name
            if m.isfile() and base in (*TRAIN_FILES, "test_batch.bin", "batches.meta.txt"):
                parts[base] = tar.extractfile(m).read()
            elif m.isfile() and base == "data_batch_1":
                _refuse_pickle(Path("cifar-10-batches-py"))
    return _assemble(parts, str(p))


def _folder(root: Path, size: int) -> ImageExamples:
    """train/<class>/* and test/<class>/*; classes sorted by name (CIFAR's own order)."""
    splits = {s: sorted(d for d in (root / s).iterdir() if d.is_dir()) for s in ("train", "test")}
    names = sorted({d.name for ds in splits.values() for d in ds})
    if not names:
        raise MissingResource(f"task.path: {root}/train has no class folders; {HELP}")
    index = {n: i for i, n in enumerate(names)}
    images, labels, is_test = [], [], []
    for s, dirs in splits.items():
        for d in dirs:
            for f in sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS):
                images.append(decode(f))
                labels.append(index[d.name])
                is_test.append(s == "test")
    if not images:
        raise MissingResource(f"task.path: no images under {root}/train or {root}/test")
    return ImageExamples(labels=np.array(labels, dtype=np.int64), label_names=names,
                         images=stack(images, size), is_test=np.array(is_test))


IMAGE_COLUMNS = ("img", "image", "image_bytes", "bytes")
LABEL_COLUMNS = ("label", "labels", "fine_label")


def _parquet(files: list[Path], size: int) -> ImageExamples:
    """HF-datasets Parquet ({"bytes", "path"} structs) or flat bytes + label columns."""
    import pyarrow.parquet as pq

    return _tables([(str(f), pq.read_table(f), _split_of(f)) for f in files], size)


def _tables(tables: list, size: int) -> ImageExamples:
    """(name, Arrow table, "train"/"test"/None) items: an image column and a label column."""
    images, raw_labels, split = [], [], []
    hf_names = None
    for f, table, where in tables:
        cols = table.column_names
        img_col = next((c for c in IMAGE_COLUMNS if c in cols), None)
        lab_col = next((c for c in LABEL_COLUMNS if c in cols), None)
        if img_col is None or lab_col is None:
            raise ValueError(f"task.path: {f} needs an image column ({'/'.join(IMAGE_COLUMNS)}) "
                             f"and a label column ({'/'.join(LABEL_COLUMNS)}); has {cols}")
        hf_names = hf_names or _hf_label_names(table.schema.metadata, lab_col)
        for cell in table.column(img_col).to_pylist():
            data = cell.get("bytes") if isinstance(cell, dict) else cell
            if not isinstance(data, bytes):
                raise ValueError(f"task.path: {f} column {img_col!r} holds no image bytes")
            images.append(decode(data))
        raw_labels.extend(table.column(lab_col).to_pylist())
        if where is None and "split" in cols:
            split.extend(s == "test" for s in table.column("split").to_pylist())
        else:
            split.extend([where == "test"] * table.num_rows)
    if all(isinstance(v, int | np.integer) for v in raw_labels):
        labels = np.asarray(raw_labels, dtype=np.int64)
        names = hf_names or list(CLASSES)
        if labels.min() < 0 or labels.max() >= len(names):
            raise ValueError(f"task.path: label {labels.max()} out of range for {len(names)} "
                             "classes")
    else:
        labels, names = label_map(raw_labels)
    is_test = np.array(split, dtype=bool)
    return ImageExamples(labels=labels, label_names=names, images=stack(images, size),
                         is_test=is_test if is_test.any() else None)


def _split_of(f: Path) -> str | None:
    """`train`/`test` from a file name word (`test-00000-of-00001`) or its folder's name."""
    words = set(re.split(r"[^a-z0-9]+", f.stem.lower())) | {f.parent.name.lower()}
    return next((s for s in ("test", "train") if s in words), None)


def _hf_label_names(metadata: dict | None, column: str) -> list[str] | None:
    """ClassLabel names from the schema metadata HF datasets writes, if any."""
    try:
        info = json.loads(metadata[b"huggingface"])
        names = info["info"]["features"][column]["names"]
        return [str(n) for n in names] if names else None
    except (KeyError, TypeError, ValueError):
        return None


def build(cfg: Config) -> ImageClassification:
    backbone = hf_backbone(resolve(cfg.model.name or VIT, None))
    examples = load_examples(cfg.task.path, cfg.task.image_size, cfg.task.split)
    return ImageClassification(cfg, examples, backbone, resolve_device(cfg.device))

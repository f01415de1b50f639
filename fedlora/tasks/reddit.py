"""`reddit` (next-token prediction) and `subreddits` (topic classification), natural
partition by user (paper: Reddit 20K+ users, perplexity; Subreddits 100 users, 50 classes).

Both read one JSONL (or Parquet/CSV) file at `task.path`, one comment per row:
`user`, `text`, plus `subreddit` for `subreddits`, and optionally `split` = train|test
(otherwise `task.test_size` comments are held out, fixed by the seed).
"""

from __future__ import annotations

from fedlora.config import Config
from fedlora.model.backbone import MissingResource
from fedlora.tasks._text2text import build_classifier
from fedlora.tasks._text_common import gpt2_backbone, split_column
from fedlora.tasks.base import Examples, resolve_device
from fedlora.tasks.lm import CausalLM, build_causal_lm
from fedlora.tasks.text_file import read_table


def _read(cfg: Config, columns: tuple[str, ...]):
    if not cfg.task.path:
        raise MissingResource(f"task.path: task '{cfg.task.name}' reads a JSONL file with one "
                              f"comment per line and keys {', '.join(columns)}; set "
                              "task.path=FILE")
    df = read_table(cfg.task.path, columns, ("split",))
    is_test = (split_column(df["split"].tolist(), cfg.task.path)
               if "split" in df.columns else None)
    return df, is_test


def load_comments(cfg: Config) -> tuple[list[str], list[str], object]:
    df, is_test = _read(cfg, ("user", "text"))
    return df["text"].astype(str).tolist(), df["user"].astype(str).tolist(), is_test


def load_subreddits(cfg: Config) -> Examples:
    df, is_test = _read(cfg, ("user", "text", "subreddit"))
    return Examples(df["text"].astype(str).tolist(), df["subreddit"].astype(str).tolist(),
                    df["user"].astype(str).tolist(), is_test)


def build_reddit(cfg: Config) -> CausalLM:
    texts, users, is_test = load_comments(cfg)
    return build_causal_lm(cfg, texts, users, is_test, gpt2_backbone(cfg),
                           resolve_device(cfg.device))


def build_subreddits(cfg: Config):
    examples = load_subreddits(cfg)
    return build_classifier(cfg, examples, gpt2_backbone(cfg), resolve_device(cfg.device))

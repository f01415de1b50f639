"""One typed experiment config: YAML in, dotted `--set` overrides, validated up front.

Every error names the dotted field and what would be valid, so a typo never
silently runs the default experiment.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, is_dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from fedlora.comm.codec import VALUE_FORMATS

OPTIMIZERS = ("fedavg", "fedadam", "fedyogi", "fedadagrad")  # fedlora/server/optim.py


class ConfigError(ValueError):
    """A bad config value; the message names the dotted field."""


@dataclass
class TaskConfig:
    name: str = "wordnet-topics"
    path: str | None = None  # data file/dir for tasks that read local data
    num_clients: int = 100
    # None = the task decides: natural when the data has users (a client column), else
    # dirichlet (labels) or iid (next-token data); the run's config.yaml records the choice.
    partition: str | None = None  # dirichlet | iid | natural | iid_mix
    alpha: float = 0.1  # Dirichlet concentration
    mix: float = 0.0  # iid_mix: fraction of each user's data pooled
    max_examples: int | None = None  # subsample the training set (quick runs)
    test_size: int = 2000  # held-out examples (stratified, fixed by the seed)
    max_length: int | None = None  # tokens; None = the task's default (fedlora.tasks.DEFAULTS)
    formulation: str = "classification"  # classification | text_to_text (label text via LM head)
    image_size: int = 224  # pixels, image tasks
    cache_dir: str | None = None  # de-quantised weights etc.; None = ~/.cache/fedlora
    # Per-client held-out split, carved from each client's training examples (stratified,
    # fixed by the seed); 0 = none. Needed by eval.personalized (docs/personalization.md).
    local_test_fraction: float = 0.0
    on_bad_rows: str = "error"  # error | skip: a malformed data row stops the run or is counted
    # Hugging Face `datasets` folders (save_to_disk) and tables: which split and columns.
    split: str | None = None  # a DatasetDict's split; None = train (+ test as the test split)
    text_column: str = "text"
    label_column: str = "label"
    client_column: str = "client"


@dataclass
class ModelConfig:
    name: str | None = None  # local folder or hub name; None = the task's default backbone
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None = the task's default (query/value)
    train_head: bool = True
    # What the flat vector holds: lora | backbone (every weight) | lora+weights (LoRA and the
    # adapted W). None: what the method trains (filled in by fedlora.engine.resolve_config).
    trainable: str | None = None


@dataclass
class MethodConfig:
    """`method.name` picks the method; every other `method.*` key is that method's own
    setting (e.g. FLASC's `d_up`), typed, defaulted and validated by the method itself
    (`fedlora.methods.resolve_settings`), peft-style: one small config per method."""

    name: str = "flasc"
    settings: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:
        settings = self.__dict__.get("settings", {})
        if key in settings:
            return settings[key]
        raise AttributeError(f"method {self.__dict__.get('name')!r} has no setting {key!r}")


@dataclass
class ClientConfig:
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 16
    epochs: int = 1
    max_steps: int | None = None  # cap on local steps per round
    # Clients trained together through one forward/backward (fedlora/client/lockstep.py):
    # K >= 1 (1 = one after another), or "auto" (see `lockstep_chunk`). 1 by default: each
    # client keeps its own dropout stream, so in-process and Flower runs agree (docs/engine.md).
    lockstep: int | str = 1
    # Processes that train a round's clients in parallel (fedlora/workers.py): P >= 1, or
    # "auto" (one per CPU thread). 1 by default: no extra processes to start.
    workers: int | str = 1


@dataclass
class RobustConfig:
    """Robust aggregation (docs/reliability.md): a norm bound, then a robust rule."""

    rule: str = "mean"  # mean (the method's own rule) | trimmed_mean | median | krum | multi_krum
    max_norm: float = math.inf  # absolute l2 bound on an update (inf = none)
    max_norm_x_median: float | None = None  # bound as a multiple of the cohort's median norm
    norm_action: str = "reject"  # reject | clip: what happens to an update above the bound
    trim: float = 0.1  # trimmed_mean: fraction cut from each end of every coordinate
    byzantine: int = 1  # krum / multi_krum: f, the number of attackers tolerated
    keep: int | None = None  # multi_krum: m updates averaged (None = n - f)


@dataclass
class ServerConfig:
    optimizer: str = "fedadam"  # fedavg | fedadam | fedyogi | fedadagrad
    lr: float = 1e-2  # paper Appendix B.4 (20NewsGroups, Reddit)
    beta1: float = 0.9
    beta2: float = 0.999
    tau: float = 1e-8  # adaptivity / eps
    bias_correction: bool = True  # the paper's Algorithm 1 instantiates torch Adam
    weight_decay: float = 0.0  # decoupled (AdamW-style); reference code used 0.01
    weighted: bool = False  # weight client updates by dataset size
    robust: RobustConfig = field(default_factory=RobustConfig)


@dataclass
class CommConfig:
    values: str = "float32"  # value encoding for both directions unless overridden
    up_values: str | None = None
    down_values: str | None = None
    max_bytes: int | None = None  # reject any payload larger than this


@dataclass
class HetConfig:
    """Budget tiers (paper Sec. 4.4): client c gets tier b_c in {1..tiers} uniformly."""

    tiers: int = 3  # b_s
    r_base: int = 4  # tier b trains rank r_base^(b-1); the server rank is r_base^(tiers-1)
    aggregation: str = "zero_pad"  # zero_pad | replication_pad | sparsity_weighted
    # Optional extras, hetlora only, both off by default (docs/heterogeneity.md).
    # HetLoRA self-pruning (Cho et al. 2023): the client adds prune_lambda * the tail norm
    # sum_layers ||B[:, r':r_c]|| ||A[r':r_c]|| (r' = max(1, floor(prune_gamma r_c))) to its
    # local loss; if the tail norm ends the round below where it started, the client keeps
    # r' ranks from then on (never below the lowest tier's rank 1).
    self_prune: bool = False
    prune_lambda: float = 0.0  # lambda >= 0; 0 = prune only when the tail shrinks on its own
    prune_gamma: float = 0.5  # gamma in (0, 1): fraction of the rank kept by a prune
    # tier: rank from the client's tier. loss (Byun & Lee 2024): each round the cohort's tier
    # ranks are handed out again, highest rank to the lowest last-reported local loss.
    rank_allocation: str = "tier"  # tier | loss


@dataclass
class DPConfig:
    """User-level DP-FedAdam (server-side Gaussian mechanism); see docs/privacy.md."""

    enabled: bool = False
    clip: float = math.inf  # l2 clip norm C per client update
    noise_multiplier: float = 0.0  # sigma: noise std on the sum is sigma * C
    noise_cohort_size: int | None = None  # simulate noise for a larger cohort M (paper)
    delta: float | None = None  # None = 1 / population
    accountant: str = "auto"  # auto | pld | rdp


@dataclass
class EvalConfig:
    """Per-client evaluation on each client's local test split (docs/personalization.md)."""

    personalized: bool = False
    clients: int = 100  # a seeded sample of clients with a local test split
    every: int | None = None  # rounds between per-client evaluations; None = eval_every
    # The local-only reference each client is compared with: this many local SGD steps
    # (client.* settings) from the initial adapter on the client's own training examples.
    local_steps: int = 50


@dataclass
class LogConfig:
    """Optional metric sinks besides metrics.jsonl (extras: `pip install fedlora[log]`)."""

    tensorboard: bool = False  # event files under RUN/tensorboard
    mlflow: bool = False  # an MLflow run in the local file store RUN/mlruns


@dataclass
class Config:
    seed: int = 0
    rounds: int = 40
    clients_per_round: int = 10  # fixed: cohort size; poisson: expected cohort size
    sampling: str = "fixed"  # fixed (uniform without replacement) | poisson
    eval_every: int = 5
    eval_batch_size: int = 128
    # Evaluations before the last round use this many test examples (a subset fixed by the
    # seed, the `eval_subset` stream); the last round always uses the whole test split.
    eval_max_examples: int | None = None  # None = the whole test split every time
    threads: int | None = None  # torch CPU threads; None = $FEDLORA_THREADS, else all cores
    checkpoint_every: int | None = None  # None = every evaluation round
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    het: HetConfig = field(default_factory=HetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["method"] = {"name": self.method.name, **self.method.settings}
        return out

    def save(self, path: str | Path) -> None:
        """Write the resolved config atomically (a kill never leaves a torn config.yaml)."""
        from fedlora.rundir import write_text

        write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------- building


def _parse_number(text: str) -> Any:
    """Accept `1/4` for densities as well as YAML scalars."""
    if isinstance(text, str) and "/" in text:
        try:
            return float(Fraction(text.strip()))
        except (ValueError, ZeroDivisionError):
            return text
    return text


def _coerce(value: Any, typ: Any, key: str) -> Any:
    tname = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    optional = "None" in tname
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: may not be null")
    value = _parse_number(value)
    base = tname.replace(" | None", "").strip()
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            if not isinstance(value, str | int | float):
                raise ValueError
            return str(value)
        if base == "list[str]":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return list(value)
    except (ValueError, TypeError, OverflowError):
        raise ConfigError(f"{key}: expected {base}, got {value!r}") from None
    return value


def build_section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """A typed dataclass from a mapping: unknown keys and bad types raise a ConfigError that
    names the dotted field (also used by each method for its own settings)."""
    return _build(cls, data, prefix)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    if cls is MethodConfig:  # the method's own keys are typed later, by the method
        name = _coerce(data.get("name", MethodConfig.name), "str", f"{prefix}.name")
        return MethodConfig(name, {k: _parse_number(v) for k, v in data.items() if k != "name"})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where + str(unknown[0])!r} (valid: {', '.join(sorted(known))})"
        )
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if is_dataclass(sub):
            kwargs[name] = _build(type(sub), {} if data[name] is None else data[name], key)
        else:
            kwargs[name] = _coerce(data[name], f.type, key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is set to a value, not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["method.d_up=1/4", "rounds=3"]` -> nested dict, values parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        if not all(part.isidentifier() for part in key.strip().split(".")):
            raise ConfigError(f"--set {key!r}: the key must be dotted field names, e.g. "
                              "method.d_up=1/4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            problem = str(getattr(e, "problem", None) or type(e).__name__)
            raise ConfigError(f"--set {key.strip()}: value {raw!r} is not valid YAML "
                              f"({problem})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Config:
    """Build and validate a Config from an optional YAML file plus overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" line {where.line + 1}" if where is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(f"config: {p}{line} is not valid YAML ({problem})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config: cannot read {p} ({e})") from None
        if data is None:
            data = {}  # an empty file: the defaults
        if not isinstance(data, dict):
            raise ConfigError(f"config: {p} must hold a mapping of config keys, "
                              f"got {type(data).__name__} {data!r:.40}")
    over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    cfg = _build(Config, _merge(data, over), "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- validation


def check(ok: bool, key: str, msg: str) -> None:
    """Raise a ConfigError naming the dotted field `key` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def check_density(value: float, key: str) -> None:
    check(0.0 < value <= 1.0 and math.isfinite(value), key, f"must be in (0, 1], got {value}")


_check, _density = check, check_density


def validate(cfg: Config) -> None:
    """Check every general field's range and name. The task and method names, and each
    method's own settings, are checked where they are defined (`fedlora.engine.resolve_config`),
    so this module imports nothing of fedlora's."""

    _check(cfg.rounds >= 1, "rounds", f"must be >= 1, got {cfg.rounds}")
    _check(cfg.clients_per_round >= 1, "clients_per_round", "must be >= 1")
    _check(cfg.eval_every >= 1, "eval_every", "must be >= 1")
    _check(cfg.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
    _check(cfg.eval_max_examples is None or cfg.eval_max_examples >= 1, "eval_max_examples",
           "must be >= 1 (or null for the whole test split)")
    _check(cfg.threads is None or cfg.threads >= 1, "threads",
           "must be >= 1 (or null for every usable core)")
    if cfg.checkpoint_every is not None:
        _check(cfg.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
    _check(
        cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
        "device",
        f"must be auto, cpu or cuda[:N], got {cfg.device!r}",
    )
    t = cfg.task
    _check(t.num_clients >= 1, "task.num_clients", "must be >= 1")
    parts = ("dirichlet", "iid", "natural", "iid_mix")
    _check(t.partition is None or t.partition in parts, "task.partition",
           f"must be one of {', '.join(parts)} (or null: the task decides)")
    _check(t.alpha > 0, "task.alpha", f"must be > 0, got {t.alpha}")
    _check(0.0 <= t.mix <= 1.0, "task.mix", "must be in [0, 1]")
    if t.max_examples is not None:
        _check(t.max_examples >= 1, "task.max_examples", "must be >= 1")
    _check(t.test_size >= 1, "task.test_size", "must be >= 1")
    _check(t.max_length is None or t.max_length >= 2, "task.max_length", "must be >= 2")
    for k in ("text_column", "label_column", "client_column"):
        _check(bool(getattr(t, k).strip()), f"task.{k}", "must name a column")
    forms = ("classification", "text_to_text")
    _check(t.formulation in forms, "task.formulation", f"must be one of {', '.join(forms)}")
    _check(t.image_size >= 8, "task.image_size", "must be >= 8")
    m = cfg.model
    _check(m.rank >= 1, "model.rank", f"must be >= 1, got {m.rank}")
    _check(m.alpha > 0, "model.alpha", "must be > 0")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    trainables = ("lora", "backbone", "lora+weights")
    _check(m.trainable is None or m.trainable in trainables, "model.trainable",
           f"must be one of {', '.join(trainables)} or null, got {m.trainable!r}")
    c = cfg.client
    _check(c.lr > 0, "client.lr", "must be > 0")
    _check(0.0 <= c.momentum < 1.0, "client.momentum", "must be in [0, 1)")
    _check(c.batch_size >= 1, "client.batch_size", "must be >= 1")
    _check(c.epochs >= 1, "client.epochs", "must be >= 1")
    if c.max_steps is not None:
        _check(c.max_steps >= 1, "client.max_steps", "must be >= 1")
    _check(c.lockstep == "auto" or (isinstance(c.lockstep, int) and not isinstance(
        c.lockstep, bool) and c.lockstep >= 1), "client.lockstep",
        f"must be an integer >= 1 or 'auto', got {c.lockstep!r}")
    _check(c.workers == "auto" or (isinstance(c.workers, int) and not isinstance(
        c.workers, bool) and c.workers >= 1), "client.workers",
        f"must be an integer >= 1 or 'auto', got {c.workers!r}")
    s = cfg.server
    _check(s.optimizer in OPTIMIZERS, "server.optimizer",
           f"unknown optimizer {s.optimizer!r} (valid: {', '.join(OPTIMIZERS)})")
    _check(s.lr > 0, "server.lr", "must be > 0")
    _check(0.0 <= s.beta1 < 1.0, "server.beta1", "must be in [0, 1)")
    _check(0.0 <= s.beta2 < 1.0, "server.beta2", "must be in [0, 1)")
    _check(s.tau > 0, "server.tau", "must be > 0")
    _check(s.weight_decay >= 0, "server.weight_decay", "must be >= 0")
    for k in ("values", "up_values", "down_values"):
        v = getattr(cfg.comm, k)
        if v is not None:
            _check(v in VALUE_FORMATS, f"comm.{k}",
                   f"unknown value format {v!r} (valid: {', '.join(VALUE_FORMATS)})")
    _check(cfg.sampling in ("fixed", "poisson"), "sampling", "must be fixed or poisson")
    h = cfg.het
    _check(h.tiers >= 1, "het.tiers", "must be >= 1")
    _check(h.r_base >= 2 or h.tiers == 1, "het.r_base", "must be >= 2")
    rules = ("zero_pad", "replication_pad", "sparsity_weighted")
    _check(h.aggregation in rules, "het.aggregation", f"must be one of {', '.join(rules)}")
    _check(math.isfinite(h.prune_lambda) and h.prune_lambda >= 0, "het.prune_lambda",
           f"must be a finite number >= 0, got {h.prune_lambda}")
    _check(0.0 < h.prune_gamma <= 1.0, "het.prune_gamma", f"must be in (0, 1], got {h.prune_gamma}")
    allocations = ("tier", "loss")
    _check(h.rank_allocation in allocations, "het.rank_allocation",
           f"must be one of {', '.join(allocations)}, got {h.rank_allocation!r}")
    if h.self_prune:
        _check(h.prune_gamma < 1.0, "het.prune_gamma",
               "must be < 1 with het.self_prune (gamma = 1 never prunes)")
    else:
        _check(h.prune_lambda == 0, "het.prune_lambda", "is only used with het.self_prune=true")
    if h.rank_allocation == "loss":
        _check(not h.self_prune, "het.rank_allocation",
               "loss reassigns ranks every round; it cannot be combined with het.self_prune")
        _check(not cfg.dp.enabled, "het.rank_allocation",
               "loss lets one client's reported loss change another's rank, outside the DP "
               "mechanism; use tier with dp.enabled")
    dp = cfg.dp
    _check(dp.clip > 0, "dp.clip", f"must be > 0 (inf = no clipping), got {dp.clip}")
    _check(dp.noise_multiplier >= 0, "dp.noise_multiplier", "must be >= 0")
    _check(not (dp.noise_multiplier > 0 and math.isinf(dp.clip)), "dp.clip",
           "noise needs a finite clip norm (the noise std is sigma * C)")
    if dp.noise_cohort_size is not None:
        _check(dp.noise_cohort_size >= cfg.clients_per_round, "dp.noise_cohort_size",
               f"must be >= clients_per_round ({cfg.clients_per_round})")
    if dp.delta is not None:
        _check(0 < dp.delta < 1, "dp.delta", "must be in (0, 1)")
    _check(dp.accountant in ("auto", "pld", "rdp"), "dp.accountant", "must be auto, pld or rdp")
    if dp.enabled and dp.accountant == "pld":
        _check(cfg.sampling == "poisson", "dp.accountant",
               "pld accounts Poisson sampling only; with sampling=fixed use rdp (replace-one)")
    if cfg.comm.max_bytes is not None:
        _check(cfg.comm.max_bytes >= 16, "comm.max_bytes", "must be >= 16")
    _validate_personal(cfg)
    _validate_general(cfg)


def _validate_personal(cfg: Config) -> None:
    """task.local_test_fraction and eval.*."""
    f = cfg.task.local_test_fraction
    _check(0.0 <= f < 1.0 and math.isfinite(f), "task.local_test_fraction",
           f"must be in [0, 1), got {f}")
    e = cfg.eval
    _check(e.clients >= 1, "eval.clients", f"must be >= 1, got {e.clients}")
    if e.every is not None:
        _check(e.every >= 1, "eval.every", f"must be >= 1, got {e.every}")
    _check(e.local_steps >= 1, "eval.local_steps", f"must be >= 1, got {e.local_steps}")
    if e.personalized:
        _check(f > 0, "eval.personalized",
               "needs each client's local test split: set task.local_test_fraction > 0 "
               "(e.g. 0.2)")


# ---------------------------------------------------------------- general fields
# Rules that apply across sections: finite numbers, the seed's range, settings that would
# silently do nothing, data-row handling and robust aggregation (docs/reliability.md).

# Float fields where inf means "no bound"; every other float must be finite, and no float NaN.
INF_ALLOWED = frozenset({"dp.clip", "server.robust.max_norm"})
ROBUST_RULES = ("mean", "trimmed_mean", "median", "krum", "multi_krum")


def _float_fields(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    out = []
    for f in fields(obj):
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out += _float_fields(value, key + ".")
        elif isinstance(value, float):
            out.append((key, value))
    return out


def _validate_general(cfg: Config) -> None:
    for key, value in _float_fields(cfg):
        _check(not math.isnan(value), key, "must be a number, got nan")
        if key not in INF_ALLOWED:
            _check(math.isfinite(value), key, f"must be finite, got {value}")
    _check(0 <= cfg.seed < 2**63, "seed", f"must be an integer in [0, 2**63), got {cfg.seed}")
    _check(cfg.dp.enabled or cfg.dp.noise_multiplier == 0, "dp.noise_multiplier",
           f"is {cfg.dp.noise_multiplier} but dp.enabled=false, so no noise would be added "
           "and the run would not be private; set dp.enabled=true or dp.noise_multiplier=0")
    _check(cfg.task.on_bad_rows in ("error", "skip"), "task.on_bad_rows",
           f"must be error or skip, got {cfg.task.on_bad_rows!r}")
    r = cfg.server.robust
    _check(r.rule in ROBUST_RULES, "server.robust.rule",
           f"must be one of {', '.join(ROBUST_RULES)}, got {r.rule!r}")
    _check(r.max_norm > 0, "server.robust.max_norm", f"must be > 0 (inf = none), got {r.max_norm}")
    if r.max_norm_x_median is not None:
        _check(r.max_norm_x_median > 0, "server.robust.max_norm_x_median",
               f"must be > 0 or null, got {r.max_norm_x_median}")
    _check(r.norm_action in ("reject", "clip"), "server.robust.norm_action",
           f"must be reject or clip, got {r.norm_action!r}")
    _check(0.0 <= r.trim < 0.5, "server.robust.trim", f"must be in [0, 0.5), got {r.trim}")
    _check(r.byzantine >= 0, "server.robust.byzantine", f"must be >= 0, got {r.byzantine}")
    if r.keep is not None:
        _check(r.keep >= 1, "server.robust.keep", f"must be >= 1 or null, got {r.keep}")
        _check(r.rule == "multi_krum", "server.robust.keep", "only applies to multi_krum")
    if r.rule in ("krum", "multi_krum") and cfg.sampling == "fixed":
        _check(cfg.clients_per_round >= 2 * r.byzantine + 3, "server.robust.byzantine",
               f"{r.rule} tolerates f attackers only with a cohort of at least 2f + 3 "
               f"(clients_per_round={cfg.clients_per_round}, f={r.byzantine})")
    _validate_dp_composition(cfg)


def _validate_dp_composition(cfg: Config) -> None:
    """What DP composes with (docs/privacy.md): the Gaussian mechanism's sensitivity is C
    only while each client moves the noised sum by at most C and nothing else depends on
    who took part. Rules that break that are refused, never silently ignored."""
    if not cfg.dp.enabled:
        return
    _check(not cfg.server.weighted, "server.weighted",
           "weights by dataset size depend on the clients' data; user-level DP weights every "
           "user equally (set server.weighted=false with dp.enabled)")
    if cfg.method.name in ("hetlora", "all_lowest_tier", "highest_tier_only"):
        _check(cfg.het.aggregation == "zero_pad", "het.aggregation",
               f"{cfg.het.aggregation} divides or weights by who took part (their ranks or "
               "update norms), which the DP noise does not cover; use zero_pad with dp.enabled")
    r = cfg.server.robust
    _check(r.rule == "mean", "server.robust.rule",
           f"{r.rule} selects or reorders updates by their values, so one client can move "
           "the aggregate by more than dp.clip; only an absolute norm bound composes with DP")
    _check(r.max_norm_x_median is None, "server.robust.max_norm_x_median",
           "a bound relative to the cohort's median norm lets one client change another's "
           "clipping; use server.robust.max_norm (absolute) with dp.enabled")
    if cfg.log.tensorboard:
        import importlib.util

        _check(importlib.util.find_spec("tensorboard") is not None, "log.tensorboard",
               "the tensorboard package is not installed (pip install 'fedlora[log]')")

"""Inputs that are wrong: configs (a hypothesis property test), wire payloads, top-k counts."""

from __future__ import annotations

import dataclasses
import math
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.comm import codec
from fedlora.comm.codec import CodecError, decode, decode_sparse, encode, header
from fedlora.comm.topk import num_kept, topk_mask
from fedlora.config import Config, ConfigError
from fedlora.config import load_config as _load_config
from fedlora.engine import resolve_config


def load_config(path=None, overrides=None) -> Config:
    """What the CLI does: the general fields, then the task/method names and the method's
    own settings (validated by the method, fedlora.engine.resolve_config)."""
    return resolve_config(_load_config(path, overrides))


# ------------------------------------------------------------------------------ config


def dotted_fields(obj=None, prefix: str = "") -> dict[str, object]:
    obj = Config() if obj is None else obj
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(dotted_fields(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


FIELDS = dotted_fields()
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in FIELDS if "." in k})


def assert_one_line_naming_a_field(err: ConfigError) -> None:
    msg = str(err)
    assert "\n" not in msg and msg, repr(msg)
    named = [k for k in [*FIELDS, *SECTIONS] if k in msg]
    assert named or msg.startswith(("--set", "unknown config key", "config:")), msg


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["1/4", "1/0", "inf", "-inf", "nan", "0", "-1", "2**63", "1e400", "", "[",
                     "{a: 1}", "!!python/object:os.system", "true", "null", "1/3", "0.29"]))
values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.text(max_size=5), scalars, max_size=2))
keys = st.one_of(st.sampled_from(sorted([*FIELDS, *SECTIONS])), st.text(max_size=15))
yaml_keys = st.one_of(keys, st.integers(-3, 3), st.booleans(), st.none())


def _as_yaml_scalar(v) -> str:
    return v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(keys, values), max_size=5))
def test_random_set_strings_fail_only_with_one_line_config_errors(pairs):
    items = []
    for k, v in pairs:
        try:
            items.append(f"{k}={_as_yaml_scalar(v)}")
        except yaml.YAMLError:
            continue
    try:
        cfg = load_config(None, items)
    except ConfigError as e:
        assert_one_line_naming_a_field(e)
        return
    # accepted: every float is a real number, and everything the validator promises holds
    for k, v in dotted_fields(cfg).items():
        if isinstance(v, float):
            assert not math.isnan(v), k
    assert cfg.seed >= 0 and math.isfinite(cfg.client.lr) and math.isfinite(cfg.server.lr)


def nested(pairs) -> dict:
    tree: dict = {}
    for k, v in pairs:
        node = tree
        parts = k.split(".") if isinstance(k, str) else [k]
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[parts[-1]] = v
    return tree


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.lists(st.tuples(yaml_keys, values), max_size=6).map(nested), values))
def test_random_yaml_configs_fail_only_with_one_line_config_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_config(path)
    except ConfigError as e:
        assert_one_line_naming_a_field(e)


@pytest.mark.parametrize("items,field", [
    (["server.lr=inf"], "server.lr"), (["client.lr=.inf"], "client.lr"),
    (["client.lr=nan"], "client.lr"), (["seed=-1"], "seed"), (["seed=1e400"], "seed"),
    (["seed=inf"], "seed"), (["task=0"], "task"), (["server.robust=3"], "server.robust"),
    (["dp.noise_multiplier=1", "dp.clip=1"], "dp.noise_multiplier"),
    (["task.alpha=inf"], "task.alpha"),
    (["method.d_up=1/0"], "method.d_up"), (["rounds=["], "--set rounds"),
    (["task.on_bad_rows=maybe"], "task.on_bad_rows"),
    (["server.robust.rule=bulyan"], "server.robust.rule"),
    (["server.robust.trim=0.5"], "server.robust.trim"),
])
def test_section0_config_defects_are_refused_naming_the_field(items, field):
    from fedlora.engine import resolve_config  # method settings are the method's to check

    with pytest.raises(ConfigError) as e:
        resolve_config(load_config(None, items))
    assert str(e.value).startswith(field), str(e.value)
    assert "\n" not in str(e.value)


def test_task_zero_in_yaml_is_refused_not_the_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task: 0\n")
    with pytest.raises(ConfigError, match="^task: expected a mapping, got 0"):
        load_config(p)
    p.write_text("task:\n")  # an empty section still means the defaults
    assert load_config(p).task.name == "wordnet-topics"


def test_noise_without_dp_enabled_is_refused_and_allowed_with_it():
    with pytest.raises(ConfigError, match="would not be private"):
        load_config(None, ["dp.noise_multiplier=1", "dp.clip=1"])
    cfg = load_config(None, ["dp.enabled=true", "dp.noise_multiplier=1", "dp.clip=1"])
    assert cfg.dp.noise_multiplier == 1.0
    assert load_config(None, ["dp.clip=inf"]).dp.clip == math.inf  # inf = no clip: allowed


# ------------------------------------------------------------------------------ top-k count


def test_num_kept_has_no_floating_point_loss():
    assert 0.29 * 100 < 29  # the float product really is 28.999...
    assert num_kept(100, 0.29) == 29
    assert num_kept(100, 0.57) == 57 and num_kept(50, 0.58) == 29 and num_kept(90, 0.7) == 63
    assert num_kept(300, 1 / 3) == 100 and num_kept(3, 1 / 3) == 1
    # exact products keep the floor rule; genuine fractions below an integer still round down
    assert num_kept(10, 0.25) == 2 and num_kept(10, 0.29) == 2 and num_kept(7, 1 / 7) == 1
    assert num_kept(1000, 0.2999) == 299 and num_kept(5, 1.0) == 5 and num_kept(5, 1e-9) == 1
    for n in range(1, 400):
        for num in range(1, 101):
            assert num_kept(n, num / 100) == max(1, num * n // 100), (n, num)  # exact decimals
    assert int(topk_mask(torch.rand(100), 0.29).sum()) == 29


# ------------------------------------------------------------------------------ wire


def test_codec_error_only_for_malformed_input_bugs_propagate(monkeypatch):
    payload = encode(torch.randn(64), torch.rand(64) < 0.3)

    def broken(*a, **k):
        raise IndexError("a bug in the decoder")

    monkeypatch.setattr(codec, "_decode_positions", broken)
    with pytest.raises(IndexError, match="a bug in the decoder"):  # not disguised as CodecError
        decode(payload, 64)

    def oom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(codec, "_decode_positions", oom)
    with pytest.raises(MemoryError):
        decode(payload, 64)
    monkeypatch.setattr(codec, "_parse", broken)
    with pytest.raises(IndexError):
        header(payload)


def _sealed(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_a_40_byte_payload_claiming_a_huge_n_allocates_nothing_big():
    big = 2**32 - 1  # the largest n the u32 header field can claim
    golomb_sub = struct.pack("<III", 1, 1, 0)  # M=1, one unary bit, no extras: one position
    body = struct.pack("<3sBIIBB", b"FLC", 1, big, 1, 2, 0) + golomb_sub + b"\x00" + b"\0" * 4
    bodies = {
        "golomb k=1": body,
        "bitmap": struct.pack("<3sBIIBB", b"FLC", 1, big, 1, 1, 0).ljust(36, b"\0"),
        "dense": struct.pack("<3sBIIBB", b"FLC", 1, big, big, 0, 0).ljust(36, b"\0"),
        "enum": struct.pack("<3sBIIBB", b"FLC", 1, big, 1, 3, 0)
        + struct.pack("<IIII", 1, 2**26, 0, 6) + b"\0" * 4,
        "int4 k huge": struct.pack("<3sBIIBB", b"FLC", 1, big, big, 0, 4) + struct.pack("<I", 1)
        + b"\0" * 16,
    }
    tracemalloc.start()
    try:
        for name, b in bodies.items():
            p = _sealed(b)
            assert len(p) <= 40, name
            with pytest.raises(CodecError):
                header(p) if name != "golomb k=1" else decode(p, 1000)  # wrong n: refused
            with pytest.raises(CodecError):
                decode(p, 2**40)  # a receiver expecting an n beyond the format
        # the one valid message (one position, value 0.0) decodes sparsely at O(k) memory
        pos, vals = decode_sparse(_sealed(body), big)
        assert pos.tolist() == [0] and vals.tolist() == [0.0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_fuzz_10000_structured_mutations_only_codec_errors():
    """Field-aware forgeries (every header/sub-header field set to edge values, resealed so the
    CRC passes) on top of tests/test_codec.py's random mutations: CodecError or a valid
    decode, never another exception; counted for docs/reliability.md."""
    rng = np.random.default_rng(15)
    corpus = []
    for n, k in [(1, 1), (64, 0), (64, 13), (500, 25), (500, 400), (4096, 40), (4096, 2000)]:
        for fmt in codec.VALUE_FORMATS:
            mask = torch.zeros(n, dtype=torch.bool)
            mask[torch.from_numpy(rng.choice(n, k, replace=False))] = True
            corpus.append((encode(torch.randn(n), mask, values=fmt, block_size=7), n))
    edges = [0, 1, 2, 3, 4, 63, 64, 65, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
    rejected = decoded = 0
    for _ in range(10_000):
        payload, n = corpus[int(rng.integers(len(corpus)))]
        b = bytearray(payload[:-4])
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(3, max(4, min(len(b) - 4, 40))))
            width = int(rng.choice([1, 4]))
            value = int(rng.choice(edges)) % (256 if width == 1 else 2**32)
            if at + width <= len(b):
                struct.pack_into("<B" if width == 1 else "<I", b, at, value)
        try:
            out = decode(_sealed(bytes(b)), n)
        except CodecError:
            rejected += 1
            continue
        assert out.shape == (n,) and torch.isfinite(out).all()
        decoded += 1
    assert rejected + decoded == 10_000 and rejected > 9_000


@pytest.mark.parametrize("items,field", [
    (["server.weighted=true"], "server.weighted"),
    (["method.name=hetlora", "model.rank=4", "het.r_base=2",
      "het.aggregation=replication_pad"], "het.aggregation"),
    (["method.name=hetlora", "model.rank=4", "het.r_base=2",
      "het.aggregation=sparsity_weighted"], "het.aggregation"),
    (["server.robust.rule=trimmed_mean"], "server.robust.rule"),
    (["server.robust.rule=krum"], "server.robust.rule"),
    (["server.robust.max_norm_x_median=3"], "server.robust.max_norm_x_median"),
])
def test_dp_refuses_rules_its_noise_does_not_cover(items, field):
    dp = ["dp.enabled=true", "dp.clip=1", "dp.noise_multiplier=0.5"]
    load_config(None, [i for i in items if "dp" not in i])  # fine without DP
    with pytest.raises(ConfigError) as e:
        load_config(None, [*dp, *items])
    assert str(e.value).startswith(field + ":"), str(e.value)
    # what does compose: zero_pad, plain mean, an absolute norm bound
    load_config(None, [*dp, "method.name=hetlora", "model.rank=4", "het.r_base=2",
                       "server.robust.max_norm=5"])


def test_krum_needs_a_cohort_of_2f_plus_3():
    with pytest.raises(ConfigError, match="^server.robust.byzantine: krum tolerates"):
        load_config(None, ["server.robust.rule=krum", "server.robust.byzantine=4"])
    assert load_config(None, ["server.robust.rule=multi_krum", "server.robust.byzantine=3",
                              "server.robust.keep=5"]).server.robust.keep == 5
    with pytest.raises(ConfigError, match="^server.robust.keep: only applies to multi_krum"):
        load_config(None, ["server.robust.keep=5"])

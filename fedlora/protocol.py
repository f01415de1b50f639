"""The two messages of a round: what the server tells one client, and what it answers.

A round is a protocol between a server half and a client half (docs/design.md):

    server half --ClientTask--> client half --ClientResult--> server half

`ClientTask` carries everything a client uses this round: the round and its own id, the
run seed (from which it derives its data order and dropout streams), the method's
per-client options (rank, upload density, stage, ...), the local-training settings, the
value encodings, and the payloads (`"down"`, plus any the method adds, e.g. stacking's
merged update). `ClientResult` carries the upload payload and the client's statistics.

Both convert to and from records of plain types only (int, float, str, bool, bytes and
lists of int/float), which is what a Flower ConfigRecord holds; nothing is pickled, and
`from_record` checks every field's type, so a malformed record raises `ProtocolError`
naming the field. The ledger counts `ClientTask.nbytes` (its payloads) down and
`len(ClientResult.upload)` up: every payload byte is in the ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Plain = int | float | str | bool | bytes | list[int] | list[float]


class ProtocolError(ValueError):
    """A record that is not a valid instruction or reply; the message names the field."""


TRAIN_KEYS = ("lr", "momentum", "batch_size", "epochs", "max_steps")


@dataclass(frozen=True)
class ClientTask:
    """One client's instruction for one round (server half -> client half)."""

    round: int
    client: int
    seed: int
    method: str
    n: int  # length of the flat vector both ends agree on
    train: dict[str, Any]  # lr, momentum, batch_size, epochs, max_steps (None = no cap)
    options: dict[str, Plain] = field(default_factory=dict)  # the method's per-client fields
    payloads: dict[str, bytes] = field(default_factory=dict)  # "down" and method extras
    up_values: str = "float32"
    down_values: str = "float32"

    @property
    def nbytes(self) -> int:
        """Download bytes: the length of every payload this instruction carries."""
        return sum(len(p) for p in self.payloads.values())

    def to_record(self) -> dict[str, Plain]:
        rec: dict[str, Plain] = {
            "round": self.round, "client": self.client, "seed": self.seed,
            "method": self.method, "n": self.n, "up_values": self.up_values,
            "down_values": self.down_values,
        }
        for k in TRAIN_KEYS:
            v = self.train.get(k)
            if v is not None:
                rec[f"train.{k}"] = v
        for k, v in self.options.items():
            rec[f"option.{k}"] = v
        for k, v in self.payloads.items():
            rec[f"payload.{k}"] = bytes(v)
        return rec

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ClientTask:
        r = _Reader(record, "ClientTask")
        train = {k: r.get(f"train.{k}", (int, float), None) for k in TRAIN_KEYS}
        for k in ("batch_size", "epochs", "max_steps"):
            if train[k] is not None and not isinstance(train[k], int):
                raise ProtocolError(f"ClientTask: train.{k} must be an int")
        for k in ("lr", "momentum", "batch_size", "epochs"):
            if train[k] is None:
                raise ProtocolError(f"ClientTask: train.{k} is missing")
        task = cls(round=r.get("round", int), client=r.get("client", int),
                   seed=r.get("seed", int), method=r.get("method", str), n=r.get("n", int),
                   train=train, options=r.prefixed("option."),
                   payloads=r.prefixed("payload.", bytes),
                   up_values=r.get("up_values", str), down_values=r.get("down_values", str))
        r.done()
        if "down" not in task.payloads:
            raise ProtocolError("ClientTask: payload.down is missing")
        return task


@dataclass(frozen=True)
class ClientResult:
    """One client's reply for one round (client half -> server half)."""

    round: int
    client: int
    upload: bytes
    stats: dict[str, int | float] = field(default_factory=dict)  # examples, train_loss, ...

    def to_record(self) -> dict[str, Plain]:
        rec: dict[str, Plain] = {"round": self.round, "client": self.client,
                                 "upload": bytes(self.upload)}
        rec.update({f"stat.{k}": v for k, v in self.stats.items()})
        return rec

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ClientResult:
        r = _Reader(record, "ClientResult")
        result = cls(round=r.get("round", int), client=r.get("client", int),
                     upload=r.get("upload", bytes), stats=r.prefixed("stat.", (int, float)))
        r.done()
        return result


class _Reader:
    """Strict typed access to a record: every key must be used, every type must match."""

    def __init__(self, record: Mapping[str, Any], what: str):
        if not isinstance(record, Mapping):
            raise ProtocolError(f"{what}: expected a mapping, got {type(record).__name__}")
        self.record, self.what, self.used = record, what, set()

    def get(self, key: str, types, default: Any = ...) -> Any:
        if key not in self.record:
            if default is ...:
                raise ProtocolError(f"{self.what}: {key} is missing")
            return default
        value = self.record[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple)
                                                    else (types,)):
            raise ProtocolError(f"{self.what}: {key} has type bool")
        if not isinstance(value, types):
            raise ProtocolError(f"{self.what}: {key} has type {type(value).__name__}")
        self.used.add(key)
        return value

    def prefixed(self, prefix: str, types=None) -> dict[str, Any]:
        out = {}
        for key, value in self.record.items():
            if isinstance(key, str) and key.startswith(prefix):
                if types is not None and (not isinstance(value, types)
                                          or isinstance(value, bool)):
                    raise ProtocolError(f"{self.what}: {key} has type {type(value).__name__}")
                if isinstance(value, list) and not all(
                        isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                    raise ProtocolError(f"{self.what}: {key} must be a list of numbers")
                out[key[len(prefix):]] = value
                self.used.add(key)
        return out

    def done(self) -> None:
        extra = sorted(str(k) for k in self.record if k not in self.used)
        if extra:
            raise ProtocolError(f"{self.what}: unknown field {extra[0]}")

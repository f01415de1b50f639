"""fedlora's instruction and reply as Flower records, and the size of a Flower message.

A `ClientTask` travels as one `ConfigRecord` (its payload bytes are `bytes` values in
it), a `ClientResult` likewise. A ConfigRecord is flat, so nested mappings of the
plain-data record are flattened to `a/b` keys here and rebuilt on the other side;
nothing is pickled. `message_nbytes` is what Flower itself puts on the wire for a
message: the sum of the serialized objects (message, RecordDict, records) that the
Grid pushes to the SuperLink, measured from flwr's own serializer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedlora.protocol import ClientResult, ClientTask, ProtocolError

TASK_RECORD = "fedlora.task"
RESULT_RECORD = "fedlora.result"
SEP = "/"


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested plain mapping -> flat `a/b` keys; an empty mapping is kept as key `a/`."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        key = str(key)
        if SEP in key:
            raise ProtocolError(f"record key {prefix + key!r} contains {SEP!r}")
        if isinstance(value, Mapping):
            if value:
                out.update(flatten(value, prefix + key + SEP))
            else:
                out[prefix + key + SEP] = ""
        elif value is None:
            raise ProtocolError(f"record key {prefix + key!r} is None; Flower records "
                                "hold numbers, strings, bools, bytes and lists only")
        elif isinstance(value, tuple):
            out[prefix + key] = list(value)
        else:
            out[prefix + key] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten`."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(SEP)
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if parts[-1] != "":
            node[parts[-1]] = value
    return out


def task_content(ct: ClientTask) -> RecordDict:
    """The content of a train Message: the whole instruction in one ConfigRecord."""
    return RecordDict({TASK_RECORD: ConfigRecord(flatten(ct.to_record()))})


def read_task(content: RecordDict) -> ClientTask:
    """Rebuild the instruction from a train Message's content (strict)."""
    if TASK_RECORD not in content:
        raise ProtocolError(f"message has no {TASK_RECORD!r} record "
                            f"(records: {sorted(content)})")
    return ClientTask.from_record(unflatten(dict(content[TASK_RECORD])))


def result_content(res: ClientResult) -> RecordDict:
    """The content of a reply Message: the whole ClientResult in one ConfigRecord."""
    return RecordDict({RESULT_RECORD: ConfigRecord(flatten(res.to_record()))})


def read_result(content: RecordDict) -> ClientResult:
    """Rebuild a ClientResult from a reply's content (strict)."""
    if RESULT_RECORD not in content:
        raise ProtocolError(f"reply has no {RESULT_RECORD!r} record "
                            f"(records: {sorted(content)})")
    return ClientResult.from_record(unflatten(dict(content[RESULT_RECORD])))


def message_nbytes(msg: Message) -> int:
    """Bytes Flower serializes for `msg`: every object the Grid/SuperNode pushes."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())

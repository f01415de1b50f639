"""fedlora's instruction and reply as Flower records, and the size of a Flower message.

A `ClientTask` travels as one `ConfigRecord`: its plain-data record (`to_record`: numbers,
strings, bools, lists of numbers, and its payloads as `bytes` values), a `ClientResult`
likewise; the other side rebuilds them with the strict `from_record`. Nothing is pickled.
`message_nbytes` is what Flower itself serializes for a message: the sum of the objects
(message, RecordDict, records) that the Grid or SuperNode pushes, measured with flwr's own
serializer (`InflatableObject.deflate`).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedlora.protocol import ClientResult, ClientTask, ProtocolError

TASK_RECORD = "fedlora.task"
RESULT_RECORD = "fedlora.result"


def task_content(ct: ClientTask) -> RecordDict:
    """The content of a train Message: the whole instruction in one ConfigRecord."""
    return RecordDict({TASK_RECORD: ConfigRecord(ct.to_record())})


def read_task(content: RecordDict) -> ClientTask:
    """Rebuild the instruction from a train Message's content (strict)."""
    if TASK_RECORD not in content:
        raise ProtocolError(f"message has no {TASK_RECORD!r} record "
                            f"(records: {sorted(content)})")
    return ClientTask.from_record(dict(content[TASK_RECORD]))


def result_content(res: ClientResult) -> RecordDict:
    """The content of a reply Message: the whole ClientResult in one ConfigRecord."""
    return RecordDict({RESULT_RECORD: ConfigRecord(res.to_record())})


def read_result(content: RecordDict) -> ClientResult:
    """Rebuild a ClientResult from a reply's content (strict)."""
    if RESULT_RECORD not in content:
        raise ProtocolError(f"reply has no {RESULT_RECORD!r} record "
                            f"(records: {sorted(content)})")
    return ClientResult.from_record(dict(content[RESULT_RECORD]))


def message_nbytes(msg: Message) -> int:
    """Bytes Flower serializes for `msg`: every object the Grid/SuperNode pushes."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())

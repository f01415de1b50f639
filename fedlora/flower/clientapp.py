"""The Flower ClientApp: fedlora's client half on a SuperNode.

A `query` message asks which fedlora client this node holds (its `partition-id`); a
`train` message carries one `ClientTask`, which the handler rebuilds from the record,
runs with `ClientRunner.run` on this node's own data and answers with the
`ClientResult`. The node builds its model and data from the run's fedlora config
(the same run config the ServerApp reads) plus its own node config (`data-path`).
Client-held state (flora_stacking's merged W, a personal adapter) stays on the node: in
the ClientApp's own `context.state`, which the SuperNode keeps for the run, or, where the
node config sets `state-dir` (or $FEDLORA_FLOWER_STATE), in a folder on the node that
outlives the run, so that a resumed run (a new Flower run) finds it (`held_state`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlora.config import Config, ConfigError, config_from_dict
from fedlora.flower.settings import NodeSettings, ServerSettings

if TYPE_CHECKING:
    from fedlora.protocol import ClientResult
    from fedlora.runner import ClientRunner

log = logging.getLogger("fedlora.flower")

QUERY_RECORD = "fedlora.node"

app = ClientApp()

# One runner per (config, partition) per process: a simulation-engine actor serves many
# virtual nodes and keeps its model; a deployment ClientApp process serves one message.
_RUNNERS: dict[tuple[str, int], ClientRunner] = {}


def node_config_of(context: Context) -> tuple[Config, NodeSettings]:
    """This node's fedlora Config (run config + node overrides) and node settings."""
    node = NodeSettings.from_node_config(context.node_config)
    base = ServerSettings.from_run_config(context.run_config).fedlora_config()
    over = node.overrides()
    cfg = base
    if over:
        data = base.to_dict()
        data.setdefault("task", {}).update(over["task"])
        cfg = config_from_dict(data)
    return cfg, node


def runner_for(cfg: Config, node: NodeSettings, run: str) -> ClientRunner:
    """The cached ClientRunner holding this node's model, data and client-held state."""
    key = (json.dumps(cfg.to_dict(), sort_keys=True, default=str), node.partition_id)
    if key not in _RUNNERS:
        from fedlora.client.store import ClientStore
        from fedlora.resolve import resolve_config
        from fedlora.runner import ClientRunner, set_threads
        from fedlora.tasks import build_task

        set_threads(cfg.threads)
        task = build_task(resolve_config(cfg))
        n = len(task.data.clients)
        if node.num_partitions is not None and node.num_partitions != n:
            raise ConfigError(f"node config num-partitions={node.num_partitions} but the "
                              f"fedlora config has {n} clients")
        if not 0 <= node.partition_id < n:
            raise ConfigError(f"node config partition-id={node.partition_id} is not a "
                              f"client of this config (0..{n - 1})")
        folder = state_dir(node, run)
        _RUNNERS[key] = ClientRunner(task, None if folder is None else ClientStore(folder),
                                     lockstep=cfg.client.lockstep)
    return _RUNNERS[key]


STATE_RECORD = "fedlora.client-state"


def held_state(runner: ClientRunner, context: Context, node: NodeSettings, run: str) -> None:
    """Point the runner's store at this node's client-held state before a message: its
    folder where `state_dir` names one, else the ConfigRecord `fedlora.client-state` in
    `context.state` (the same safetensors bytes per generation as a folder's files)."""
    from fedlora.client.store import ClientStore

    if state_dir(node, run) is not None:
        return  # the runner's folder store, built once
    if STATE_RECORD not in context.state:
        context.state[STATE_RECORD] = ConfigRecord()
    runner.store = ClientStore(context.state[STATE_RECORD])


def state_dir(node: NodeSettings, run: str) -> Path | None:
    """The folder where this node keeps client-held state, or None (context.state): under
    `state-dir` from the node config, else $FEDLORA_FLOWER_STATE; one folder per run (named
    by the run's `out`, so that a resumed run finds it) and client."""
    import hashlib

    root = node.state_dir or os.environ.get("FEDLORA_FLOWER_STATE")
    if not root:
        return None
    name = hashlib.sha256(run.encode()).hexdigest()[:16]
    return Path(root) / name / f"client-{node.partition_id}"


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which fedlora client this node holds."""
    node = NodeSettings.from_node_config(context.node_config)
    rec = ConfigRecord({"partition-id": node.partition_id,
                        "num-partitions": node.num_partitions or -1})
    return Message(RecordDict({QUERY_RECORD: rec}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run fedlora's client half on one instruction."""
    # Imported here: a query must not pay for torch (a ClientApp process serves one message).
    from fedlora.flower.records import read_task, result_content
    from fedlora.protocol import ProtocolError

    cfg, node = node_config_of(context)
    ct = read_task(msg.content)
    if ct.client != node.partition_id:
        raise ProtocolError(f"node {context.node_id} holds client {node.partition_id} "
                            f"but was sent the task of client {ct.client}")
    if (secs := node.sleep_before(ct.round)) > 0:
        time.sleep(secs)
    out = str(context.run_config.get("out", "") or "")
    run = out or f"run-{context.run_id}"
    runner = runner_for(cfg, node, run)
    held_state(runner, context, node, run)
    # Held state as of the end of an earlier round only: a resumed run may redo rounds.
    runner.store.rollback(ct.round - 1)
    # ...and only back to the server's last checkpoint before this round (rounds that are
    # multiples of checkpoint_every, else of eval_every): older generations are never read.
    every = cfg.checkpoint_every or cfg.eval_every
    runner.store.commit((ct.round - 1) // every * every)
    res = runner.run(ct)
    if node.fault == "corrupt":
        res = corrupt(res)
    return Message(result_content(res), reply_to=msg)


def corrupt(res: ClientResult) -> ClientResult:
    """Test hook: the same reply with garbage upload bytes."""
    from dataclasses import replace

    return replace(res, upload=b"\xde\xad\xbe\xef" * max(1, len(res.upload) // 4))

"""The Flower ServerApp: fedlora's server half driving SuperNodes through the Grid.

Each round: `RoundServer.open_round()` samples the cohort exactly as the in-process
`Simulation` does and returns one `ClientTask` per sampled client; each task goes as a
`train` Message to the SuperNode holding that client; replies are pulled until all are
in or `round-timeout` passes; `close_round` aggregates what decoded. A client whose
node is gone, silent, errored or whose reply does not decode is dropped with a reason
naming its node. Replies that arrive for an earlier round are ignored and counted.

Which node holds which client: a `query` message to every new node, answered with its
`partition-id` (see `fedlora.flower.settings`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora.config import Config, ConfigError, load_config
from fedlora.engine import RoundServer
from fedlora.flower.records import message_nbytes, read_result, task_content
from fedlora.flower.settings import ServerSettings
from fedlora.methods.base import Client
from fedlora.protocol import ClientResult, ClientTask, ProtocolError

log = logging.getLogger("fedlora.flower")

QUERY_RECORD = "fedlora.node"  # the ClientApp's answer to a query (see clientapp.py)
MAX_REASON = 400  # characters of a Flower error kept in a drop reason

app = ServerApp()


@dataclass
class NodeDirectory:
    """Which SuperNode holds which fedlora client."""

    client_node: dict[int, int] = field(default_factory=dict)
    asked: set[int] = field(default_factory=set)

    def node_of(self, client: int) -> int | None:
        """The SuperNode holding `client` (None: no connected node does)."""
        return self.client_node.get(client)

    def discover(self, grid: Grid, timeout: float, poll: float) -> None:
        """Ask every node not asked yet which client it holds."""
        online = set(grid.get_node_ids())
        new = [n for n in online if n not in self.asked]
        if not new:
            return
        self.asked.update(new)
        msgs = [Message(RecordDict(), n, "query") for n in new]
        for reply in _collect(grid, list(grid.push_messages(msgs)), timeout, poll):
            src = reply.metadata.src_node_id
            if reply.has_error() or QUERY_RECORD not in reply.content:
                log.warning("node %d did not say which client it holds: %s", src,
                            reply.error if reply.has_error() else "no record")
                continue
            c = int(reply.content[QUERY_RECORD]["partition-id"])
            # A restarted node (new id, same partition) replaces one that went offline.
            if c in self.client_node and self.client_node[c] in online:
                log.warning("node %d also claims client %d (held by node %d); ignored",
                            src, c, self.client_node[c])
                continue
            self.client_node[c] = src
            log.info("node %d holds client %d", src, c)


def _collect(grid: Grid, ids: list[str], timeout: float, poll: float,
             stale: dict[str, tuple[int, int, int]] | None = None,
             late: list[dict] | None = None) -> list[Message]:
    """Pull replies to `ids` until all are in or `timeout`; drain `stale` ids too."""
    want = {i for i in ids if i}
    got: list[Message] = []
    end = time.monotonic() + timeout
    while want and time.monotonic() < end:
        for reply in grid.pull_messages(sorted(want | set(stale or ()))):
            rid = reply.metadata.reply_to_message_id
            if stale is not None and rid in stale:
                r, c, node = stale.pop(rid)
                log.warning("ignored a late reply from node %d (client %d) for round %d",
                            node, c, r)
                if late is not None:
                    late.append({"round": r, "client": c, "node": node})
                continue
            want.discard(rid)
            got.append(reply)
        if want:
            time.sleep(poll)
    return got


def fedlora_config(s: ServerSettings) -> tuple[Config, Path, bool]:
    """The run's Config, its directory, and whether it resumes from a checkpoint."""
    cfg = s.fedlora_config()
    out = Path(s.out) if s.out else None
    if s.resume and out is not None and (out / "checkpoint.json").exists():
        cfg = load_config(out / "config.yaml", list(s.overrides))
        return cfg, out, True
    return cfg, out, False


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run fedlora's rounds over the connected SuperNodes."""
    s = ServerSettings.from_run_config(context.run_config)
    cfg, out, resume = fedlora_config(s)
    out = out or Path("runs") / f"flower-{context.run_id}"
    run_rounds(grid, cfg, out, s, resume=resume)


def run_rounds(grid: Grid, cfg: Config, out: Path, s: ServerSettings, *,
               resume: bool = False) -> dict:
    """The round loop (ServerApp main without the run-config parsing)."""
    if cfg.eval.personalized:  # before anything is written: nothing is lost
        raise ConfigError("eval.personalized: per-client evaluation runs in-process only "
                          "(fedlora run / Simulation); a Flower run cannot evaluate the model "
                          "a method deploys on a client yet, because it is built from that "
                          "client's held state, which stays on its node. Set "
                          "eval.personalized=false for the Flower run")
    server = RoundServer(cfg, out, resume=resume, progress=False)
    handler = logging.FileHandler(Path(out) / "flower.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("fedlora")  # the engine's drops land in the same file
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        if resume and server.method.client.save_state is not Client.save_state:
            log.warning("resume: method %s keeps client-held state in each ClientApp's "
                        "context.state, which a new Flower run starts empty; nodes whose node "
                        "config sets state-dir (or $FEDLORA_FLOWER_STATE) keep theirs",
                        cfg.method.name)
        return _rounds(grid, server, cfg, s)
    finally:
        root.removeHandler(handler)
        handler.close()


def _rounds(grid: Grid, server: RoundServer, cfg: Config, s: ServerSettings) -> dict:
    nodes = NodeDirectory()
    want = s.min_nodes or len(server.task.data.clients)
    end = time.monotonic() + s.node_wait
    while True:
        nodes.discover(grid, s.round_timeout, s.poll_interval)
        if len(nodes.client_node) >= want or time.monotonic() > end:
            break
        time.sleep(max(s.poll_interval, 0.5))
    log.info("%d SuperNodes hold clients %s", len(nodes.client_node),
             sorted(nodes.client_node))
    stale: dict[str, tuple[int, int, int]] = {}  # message id -> (round, client, node)
    while not server.finished:
        nodes.discover(grid, s.round_timeout, s.poll_interval)
        t, tasks = server.open_round()
        results, extra = exchange(grid, t, tasks, nodes, s, stale)
        row = server.close_round(t, tasks, results, extra=extra)
        for ct, res in zip(tasks, results):  # drops the server half decided: name the node
            c = str(ct.client)
            if not isinstance(res, str) and c in row.get("dropped_reasons", {}):
                log.warning("round %d: dropped client %s (node %s): %s", t, c,
                            extra["nodes"][c], row["dropped_reasons"][c])
        log.info("round %d: %d of %d clients aggregated", t, row["aggregated"], len(tasks))
    return server.write_summary()


def exchange(grid: Grid, t: int, tasks: list[ClientTask], nodes: NodeDirectory,
             s: ServerSettings, stale: dict[str, tuple[int, int, int]]
             ) -> tuple[list[ClientResult | str], dict]:
    """Send round t's tasks and collect the replies: per task its ClientResult or why it
    has none, and the metrics row's Flower fields."""
    results: dict[int, ClientResult | str] = {}
    msgs, sent = [], {}
    for ct in tasks:
        node = nodes.node_of(ct.client)
        if node is None:
            results[ct.client] = "no connected SuperNode holds this client"
            continue
        msgs.append((ct, Message(task_content(ct), node, "train", group_id=str(t))))
    down = sum(message_nbytes(m) for _, m in msgs)
    ids = list(grid.push_messages([m for _, m in msgs])) if msgs else []
    for mid, (ct, m) in zip(ids, msgs):
        node = m.metadata.dst_node_id
        if mid:
            sent[mid] = (ct.client, node)
        else:
            results[ct.client] = f"node {node}: push to the SuperLink failed"
    late: list[dict] = []
    up = 0
    for reply in _collect(grid, list(sent), s.round_timeout, s.poll_interval, stale, late):
        c, node = sent.pop(reply.metadata.reply_to_message_id)
        up += message_nbytes(reply)
        results[c] = _read_reply(reply, t, c, node)
    for mid, (c, node) in sent.items():
        results[c] = f"node {node}: no reply within {s.round_timeout:g}s"
        stale[mid] = (t, c, node)
    extra: dict = {"flower_down_bytes": down, "flower_up_bytes": up,
                   "nodes": {str(ct.client): nodes.node_of(ct.client) for ct in tasks}}
    if late:
        extra["late_replies"] = late
    return [results[ct.client] for ct in tasks], extra


def _read_reply(reply: Message, t: int, c: int, node: int) -> ClientResult | str:
    """The ClientResult a reply carries, or why it carries none (naming the node)."""
    if reply.has_error():
        reason = reply.error.reason  # Ray's out-of-memory reasons run to pages
        reason = reason if len(reason) <= MAX_REASON else reason[:MAX_REASON] + "..."
        return f"node {node}: ClientApp error {reply.error.code}: {reason}"
    try:
        res = read_result(reply.content)
    except (ProtocolError, ValueError, TypeError) as e:
        return f"node {node}: unreadable reply: {e}"
    if (res.round, res.client) != (t, c):
        return f"node {node}: reply is for round {res.round} client {res.client}"
    return res

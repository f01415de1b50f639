"""What a Flower run config and a SuperNode's node config mean to fedlora.

Run config (`[tool.flwr.app.config]` in flower-app/pyproject.toml, overridable with
`flwr run ... --run-config 'k=v'`):

* `config`: path of a fedlora YAML config ("" = the embedded default).
* `overrides`: space-separated dotted overrides, as `fedlora run --set`
  (`"rounds=2 method.d_up=1/4"`).
* `set.<dotted key>`: one override per key, applied after `overrides` (TOML-typed).
* `out`: run directory on the ServerApp's machine ("" = `runs/flower-<run id>`).
* `resume`: continue the run in `out` from its checkpoint (its `config.yaml` wins).
* `round-timeout`: seconds the server waits for a round's replies; the rest are dropped.
* `poll-interval`: seconds between the ServerApp's pulls of replies from the SuperLink.
* `min-nodes`: SuperNodes to wait for before round 1 (0 = `task.num_clients`).
* `node-wait`: seconds to wait for `min-nodes` (then start with whoever is there).

Node config (`flower-supernode --node-config '...'`; the simulation engine sets the
first two for each virtual node):

* `partition-id`: the fedlora client this node holds (its data partition).
* `num-partitions`: must equal the config's number of clients.
* `data-path`: this node's own data file/dir (replaces `task.path` on this node).
* `state-dir`: a folder where the node keeps client-held state, so that it outlives the
  run (a resumed run is a new Flower run); default: the ClientApp's `context.state`.
* `fault`: test hook: `corrupt` (reply garbage upload bytes), `sleep:S` (sleep S seconds
  before training), `sleep-round:R:S` (only in round R).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config import Config, ConfigError, load_config, parse_overrides


@dataclass(frozen=True)
class ServerSettings:
    """The ServerApp's settings, read from the Flower run config."""

    config: str = ""
    overrides: tuple[str, ...] = ()
    out: str = ""
    resume: bool = False
    round_timeout: float = 600.0
    poll_interval: float = 0.1
    min_nodes: int = 0
    node_wait: float = 120.0

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> ServerSettings:
        over = shlex.split(str(rc.get("overrides", "") or ""))
        over += [f"{k[4:]}={_yaml_value(v)}" for k, v in sorted(rc.items())
                 if k.startswith("set.")]
        s = cls(config=str(rc.get("config", "") or ""), overrides=tuple(over),
                out=str(rc.get("out", "") or ""), resume=bool(rc.get("resume", False)),
                round_timeout=float(rc.get("round-timeout", 600.0)),
                poll_interval=float(rc.get("poll-interval", 0.1)),
                min_nodes=int(rc.get("min-nodes", 0)),
                node_wait=float(rc.get("node-wait", 120.0)))
        if s.round_timeout <= 0:
            raise ConfigError(f"run config round-timeout: must be > 0, got {s.round_timeout}")
        if s.poll_interval <= 0:
            raise ConfigError(f"run config poll-interval: must be > 0, got {s.poll_interval}")
        return s

    def fedlora_config(self) -> Config:
        """The fedlora Config this run trains (YAML + overrides, validated)."""
        return load_config(self.config or None, parse_overrides(list(self.overrides)))


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


@dataclass(frozen=True)
class NodeSettings:
    """A SuperNode's settings, read from its node config."""

    partition_id: int
    num_partitions: int | None = None
    data_path: str | None = None
    state_dir: str | None = None
    fault: str = ""

    @classmethod
    def from_node_config(cls, nc: Mapping[str, Any]) -> NodeSettings:
        if "partition-id" not in nc:
            raise ConfigError("node config: 'partition-id' is required (the fedlora client "
                              "this SuperNode holds), e.g. --node-config 'partition-id=0 "
                              "num-partitions=3'")
        try:
            pid = int(nc["partition-id"])
            num = int(nc["num-partitions"]) if "num-partitions" in nc else None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"node config: partition-id/num-partitions must be "
                              f"integers, got {dict(nc)}") from e
        path = nc.get("data-path")
        return cls(partition_id=pid, num_partitions=num,
                   data_path=str(Path(str(path)).expanduser()) if path else None,
                   state_dir=str(nc["state-dir"]) if nc.get("state-dir") else None,
                   fault=str(nc.get("fault", "")))

    def overrides(self) -> dict[str, Any]:
        """Config overrides this node applies on top of the run's config."""
        return {"task": {"path": self.data_path}} if self.data_path else {}

    def sleep_before(self, round_: int) -> float:
        """Test hook: seconds to sleep before training in `round_` (0 = none)."""
        kind, _, arg = self.fault.partition(":")
        if kind == "sleep":
            return float(arg)
        if kind == "sleep-round":
            r, _, secs = arg.partition(":")
            return float(secs) if int(r) == round_ else 0.0
        return 0.0

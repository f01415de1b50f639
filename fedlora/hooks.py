"""What the engine calls after each round and at the end of a run, outside the round itself:
metric sinks (`log.*`), the best round's adapter (for `fedlora export --round best`) and
the end-of-run export. Nothing here changes the federated computation or its results.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("fedlora")


class RunHooks:
    """Per-run state of the hooks: open sinks and the best value so far."""

    def __init__(self, sim: Any, first_round: int):
        from fedlora.export import BEST_DIR
        from fedlora.logsinks import open_sinks

        self.utility = sim.task.utility
        self.higher = getattr(sim.task, "higher_is_better", True)
        self.sinks = open_sinks(sim.cfg, Path(sim.out), self.utility, first_round)
        best = Path(sim.out) / BEST_DIR / "best.json"
        self.best = json.loads(best.read_text()).get(self.utility) if best.is_file() else None

    def better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.higher else value < self.best


def named_vector(sim: Any, vector=None) -> dict:
    """The server vector (or `vector`) by parameter name, as adapter.safetensors holds it."""
    v = sim.P if vector is None else vector
    return {e.name: v[e.slice].view(e.shape) for e in sim.adapter.layout}


def round_end(sim: Any, row: dict) -> None:
    """After a round's metrics row is written: log it and keep the best round's adapter."""
    from fedlora.export import save_best

    hooks = getattr(sim, "_run_hooks", None)
    if hooks is None:
        hooks = sim._run_hooks = RunHooks(sim, int(row["round"]))
    for sink in hooks.sinks:
        sink.log(row)
    value = row.get(hooks.utility)
    if isinstance(value, int | float) and hooks.better(float(value)):
        hooks.best = float(value)
        save_best(Path(sim.out), named_vector(sim),
                  {"round": int(row["round"]), hooks.utility: float(value)})


def run_end(sim: Any, summary: dict) -> None:
    """At the end of a run, before its summary.json marks it finished: close the sinks and
    export the final model (RUN/export)."""
    from fedlora.export import EXPORT_DIR, ExportError, export_task

    hooks = getattr(sim, "_run_hooks", None)
    for sink in hooks.sinks if hooks is not None else []:
        sink.close()
    sim._run_hooks = None
    initial = getattr(sim.task, "initial_vector", None)
    try:
        export_task(sim.task, sim.cfg, named_vector(sim), Path(sim.out) / EXPORT_DIR,
                    source={"run": str(sim.out), "round_kind": "last",
                            "round": summary["rounds"], **summary.get("final", {})},
                    initial=None if initial is None else named_vector(sim, initial))
    except (ExportError, OSError, ValueError, RuntimeError) as e:
        log.warning("the run finished but its export failed (%s); retry with "
                    "`fedlora export %s`", e, sim.out)

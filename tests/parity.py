"""The parity fixture: final-vector SHA-256, metrics and ledger of a tiny run of every method.

Results must not move unless an issue says so. `tests/test_parity.py` reruns every case and
compares with `tests/fixtures/parity.json`; regenerate it (only when a change is meant to move
results, and then rerun BENCHMARKS.md) with

    HF_HUB_OFFLINE=1 .venv/bin/python tests/parity.py --write

A new method adds its cases to CASES and records only those (existing entries untouched) with

    HF_HUB_OFFLINE=1 .venv/bin/python tests/parity.py --add-new

and a case an issue allows to move is re-recorded alone (say which issue in the commit):

    HF_HUB_OFFLINE=1 .venv/bin/python tests/parity.py --rerecord NAME [NAME ...]

Moved so far: `hetlora_dp` (issue 15: DP clips HetLoRA's per-client zero_pad term, the
term the rule averages, so one client moves the sum by at most C).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import torch

FIXTURE = Path(__file__).parent / "fixtures" / "parity.json"
TIMING = ("wall_s", "eval_s")

HET = {"het.tiers": 3, "het.r_base": 2, "model.rank": 4}
DP = {"dp.enabled": True, "dp.clip": 0.5, "dp.noise_multiplier": 0.3}
PERSONAL = {"task.local_test_fraction": 0.25, "eval.personalized": True, "eval.clients": 3,
            "eval.local_steps": 2}

CASES: dict[str, dict] = {
    "flasc": {"method.name": "flasc", "method.d_up": "1/4"},
    "flasc_down": {"method.name": "flasc", "method.d_up": "1/4", "method.d_down": "1/2"},
    "flasc_int8": {"method.name": "flasc", "method.d_up": "1/4", "comm.values": "int8"},
    "lora": {"method.name": "lora"},
    "lora_fedavg_weighted": {"method.name": "lora", "server.optimizer": "fedavg",
                             "server.lr": 1.0, "server.weighted": True},
    "adapter_lth": {"method.name": "adapter_lth", "method.prune_ratio": 0.2},
    "sparse_adapter": {"method.name": "sparse_adapter", "method.density": "1/4"},
    "federated_select": {"method.name": "federated_select", "method.density": "1/2"},
    "ffa_lora": {"method.name": "ffa_lora"},
    "full_finetune": {"method.name": "full_finetune"},
    "fedsparsify": {"method.name": "fedsparsify", "method.prune_ratio": 0.2},
    "spdst": {"method.name": "spdst", "method.density": "1/2"},
    "federated_select_backbone": {"method.name": "federated_select_backbone",
                                  "method.density": "1/2"},
    "hetlora_zero_pad": {"method.name": "hetlora", **HET, "het.aggregation": "zero_pad"},
    "hetlora_replication_pad": {"method.name": "hetlora", **HET,
                                "het.aggregation": "replication_pad"},
    "hetlora_sparsity_weighted": {"method.name": "hetlora", **HET,
                                  "het.aggregation": "sparsity_weighted"},
    "hetlora_self_prune": {"method.name": "hetlora", **HET, "het.self_prune": True,
                           "het.prune_lambda": 0.5},
    "hetlora_loss_ranks": {"method.name": "hetlora", **HET, "het.rank_allocation": "loss",
                           "het.aggregation": "replication_pad"},
    "flasc_tiers": {"method.name": "flasc_tiers", **HET},
    "all_lowest_tier": {"method.name": "all_lowest_tier", **HET},
    "highest_tier_only": {"method.name": "highest_tier_only", **HET},
    "flora_two_stage": {"method.name": "flora_two_stage", "method.stage1_rounds": 1},
    "slora_two_stage": {"method.name": "flora_two_stage", "method.stage1_rounds": 1,
                        "method.stage1_density": 0.5, "method.stage1_lr": 0.005},
    "flora_stacking": {"method.name": "flora_stacking", **HET, "rounds": 3},
    "flasc_dp": {"method.name": "flasc", "method.d_up": "1/4", **DP},
    "lora_dp_poisson": {"method.name": "lora", **DP, "sampling": "poisson"},
    "hetlora_dp": {"method.name": "hetlora", **HET, **DP},
    "ffa_lora_dp": {"method.name": "ffa_lora", **DP},
    # personalization (issue 17), with per-client evaluation on 3 clients
    "local_only": {"method.name": "local_only", **PERSONAL},
    "finetune_global": {"method.name": "finetune_global", "method.d_up": "1/4",
                        "method.finetune_steps": 3, **PERSONAL},
    "fdlora": {"method.name": "fdlora", "method.d_up": 1, **PERSONAL},
    "fdlora_d_up": {"method.name": "fdlora", "method.d_up": "1/4", **PERSONAL},
    "flasc_personal": {"method.name": "flasc_personal", "method.d_up": "1/4", "rounds": 3,
                       **PERSONAL},
}


def run_case(name: str, model_dir: Path, data: Path, out: Path) -> dict:
    """Run one case into `out` and return its digest record."""
    from conftest import tiny_overrides

    from fedlora.config import load_config
    from fedlora.engine import Simulation
    from fedlora.rundir import read_jsonl

    # Pinned to sequential training: the fixture predates lockstep, whose dropout draws
    # differ (fedlora/client/lockstep.py); "auto" would pick lockstep on an accelerator.
    cfg = load_config(None, tiny_overrides(model_dir, data, **{"client.lockstep": 1,
                                                                **CASES[name]}))
    sim = Simulation(cfg, out, progress=False)
    sim.run()
    P = sim.P.detach().cpu().contiguous()
    metrics = [{k: v for k, v in r.items() if k not in TIMING}
               for r in read_jsonl(out / "metrics.jsonl")]
    return {"sha256": hashlib.sha256(P.numpy().tobytes()).hexdigest(), "n": P.numel(),
            "sum": float(P.double().sum()), "metrics": metrics,
            "ledger": read_jsonl(out / "ledger.jsonl")}


def environment() -> dict:
    return {"torch": torch.__version__, "machine": platform.machine()}


def main() -> None:
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_text_file, make_tiny_bert

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_tiny_bert(tmp / "tiny-bert")
        data = make_text_file(tmp / "data.jsonl")
        cases = {}
        for name in CASES:
            cases[name] = run_case(name, model_dir, data, tmp / name)
            print(name, cases[name]["sha256"][:16], flush=True)
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({"environment": environment(), "cases": cases}, indent=1)
                       + "\n")


def add_new_cases(names: list[str] | None = None) -> None:
    """Record only the cases the fixture lacks (a new method); recorded ones never change,
    except the ones named in `names` (`--rerecord NAME...`: an issue said they may move)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_text_file, make_tiny_bert

    torch.set_num_threads(1)
    fixture = json.loads(FIXTURE.read_text())
    if fixture["environment"] != environment():
        sys.exit(f"fixture recorded on {fixture['environment']}, here {environment()}")
    new = [name for name in CASES if name not in fixture["cases"] or name in (names or [])]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_tiny_bert(tmp / "tiny-bert")
        data = make_text_file(tmp / "data.jsonl")
        for name in new:
            fixture["cases"][name] = run_case(name, model_dir, data, tmp / name)
            print(name, fixture["cases"][name]["sha256"][:16], flush=True)
    FIXTURE.write_text(json.dumps(fixture, indent=1) + "\n")


if __name__ == "__main__":
    if "--add-new" in sys.argv:
        add_new_cases()
    elif "--rerecord" in sys.argv:
        add_new_cases(sys.argv[sys.argv.index("--rerecord") + 1:])
    elif "--write" in sys.argv:
        main()
    else:
        sys.exit("usage: tests/parity.py --write (regenerates tests/fixtures/parity.json) | "
                 "--add-new (records only cases the fixture lacks)")

"""The round loop: a server half and a client half, and the instruction/reply between them.

    RoundServer.open_round  -> ClientTask per sampled client (payloads encoded, counted)
    ClientRunner.run        -> ClientResult (the client half: decode, train, encode)
    RoundServer.close_round -> decode, aggregate, step, evaluate, metrics, checkpoint

What the server aggregates is exactly what it decoded from the bytes each client sent; the
ledger counts `len(bytes)` of every payload. A client uses only its instruction, its
payloads, its own data and seeded model init, and (where a method documents it) its
client-held state. `Simulation` drives both halves in one process; `fedlora.flower` drives
the same halves over Flower. One resident model per process: clients differ only by the
flat vector swapped into it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fedlora import rundir
from fedlora.client.store import ClientStore
from fedlora.client.train import train_client
from fedlora.comm import codec
from fedlora.comm.ledger import Ledger
from fedlora.config import Config, check, config_from_dict
from fedlora.data.federated import client_batches
from fedlora.methods import METHODS, build_method, resolve_settings
from fedlora.model.flat import FlatAdapter
from fedlora.privacy import EpsilonReport, epsilon, privatize, validate_privacy_config
from fedlora.protocol import ClientResult, ClientTask
from fedlora.rng import np_rng, torch_generator, torch_seed
from fedlora.server.aggregate import weighted_mean
from fedlora.server.optim import ServerOptimizer
from fedlora.tasks import TASKS, build_task

log = logging.getLogger("fedlora")


def resolve_config(cfg: Config) -> Config:
    """Finish a loaded config for running, in place: the task and method names, the method's
    own typed settings (`method.*`) and what the flat vector holds (`model.trainable`).
    `load_config` checks the general fields; this layer knows the registries."""
    check(cfg.task.name in TASKS, "task.name",
          f"unknown task {cfg.task.name!r} (valid: {', '.join(TASKS)})")
    resolve_settings(cfg)
    return cfg


class ClientRunner:
    """The client half of every method, for the clients whose data `task` holds.

    `run` builds the method's client half from the instruction alone, decodes the download,
    trains, and encodes the upload. It sees no server state: what it uses is the
    ClientTask, the client's data, the model's seeded init and the client's held state."""

    def __init__(self, task, store: ClientStore | None = None):
        self.task = task
        self.adapter = FlatAdapter(task.model) if getattr(task, "adapter", None) is None \
            else task.adapter
        task.adapter = self.adapter
        if getattr(task, "initial_vector", None) is None:
            task.initial_vector = self.adapter.vector.detach().clone()
        self.init = task.initial_vector
        self.device = self.init.device
        self.store = store if store is not None else ClientStore(None)
        self._decoded: tuple | None = None  # (payload, mask, received, positions)

    def run_many(self, tasks: list[ClientTask]) -> list[ClientResult | str]:
        """Each client's reply, or a string saying why it has none (sequential)."""
        return [self.run(ct) for ct in tasks]

    def run(self, ct: ClientTask) -> ClientResult:
        half, start, batches = self.prepare(ct)
        stats = self.train(batches, half.train_mask(), half.penalty())
        return self.finish(ct, half, start, stats)

    def prepare(self, ct: ClientTask):
        """The client half, its start vector (loaded into the model) and its batches."""
        half = METHODS[ct.method].client(ct, self.adapter, self.init,
                                         self.store.load(ct.client))
        received, positions = self.decode_download(ct, half.down_mask())
        start = half.start(received, positions)
        self.adapter.load_(start)
        torch.manual_seed(torch_seed(ct.seed, "dropout", ct.round, ct.client))
        tr = ct.train
        batches = client_batches(self.task.data.clients[ct.client], tr["batch_size"],
                                 tr["epochs"], tr["max_steps"],
                                 np_rng(ct.seed, "data_order", ct.round, ct.client))
        self._train_cfg = tr
        return half, start, batches

    def train(self, batches, grad_mask: torch.Tensor | None, penalty=None) -> dict:
        """Local SGD with momentum on the vector loaded in the model."""
        tr = self._train_cfg
        return train_client(self.task, self.adapter, batches, lr=tr["lr"],
                            momentum=tr["momentum"], device=self.device,
                            grad_mask=grad_mask, penalty=penalty)

    def finish(self, ct: ClientTask, half, start: torch.Tensor, stats: dict) -> ClientResult:
        """After training (the trained vector is in the model): the reply."""
        stats["num_examples"] = len(self.task.data.clients[ct.client])
        half.done(start, self.adapter.vector, stats)
        delta = start - self.adapter.vector
        mask = half.upload_mask(delta)
        if half.up_implicit and mask is not None:
            upload = codec.encode(delta[mask], None, values=ct.up_values)
        else:
            upload = codec.encode(delta, mask, values=ct.up_values)
        state = half.save_state()
        if state is not None:
            self.store.save(ct.client, ct.round, state)
        return ClientResult(ct.round, ct.client, upload, stats)

    def decode_download(self, ct: ClientTask, mask: torch.Tensor | None):
        """The dense start vector the download carries, and its positions (None = all).

        Clients of a round are usually sent the same payload object: decode it once."""
        payload = ct.payloads["down"]
        hit = self._decoded
        if hit is not None and hit[0] is payload and _same_mask(hit[1], mask):
            return hit[2].clone(), hit[3]
        if mask is not None:  # values only, at a mask the client derived itself
            received = torch.zeros(ct.n, device=self.device)
            received[mask] = codec.decode(payload, int(mask.sum())).to(self.device)
            positions = mask
        else:
            pos, vals = codec.decode_sparse(payload, ct.n)
            if vals.numel() == ct.n:
                received, positions = vals.to(self.device), None
            else:
                out = np.zeros(ct.n, np.float32)
                out[pos.numpy()] = vals.numpy()
                received = torch.from_numpy(out).to(self.device)
                positions = torch.zeros(ct.n, dtype=torch.bool)
                positions[pos] = True
                positions = positions.to(self.device)
        self._decoded = (payload, None if mask is None else mask.clone(), received, positions)
        return received.clone(), positions


class RoundServer:
    """The server half: sampling, instructions, decoding, aggregation, the server step,
    evaluation and the run directory. `open_round`/`close_round` bracket one round."""

    def __init__(self, cfg: Config, out: str | Path, *, resume: bool = False,
                 progress: bool = True, task=None):
        self.cfg, self.progress = resolve_config(cfg), progress
        self.out = rundir.prepare(Path(out), resume, create=False)
        self.task = task if task is not None else build_task(cfg)
        if getattr(self.task, "adapter", None) is None:
            self.task.adapter = FlatAdapter(self.task.model)
        self.adapter = self.task.adapter
        self.device = self.adapter.vector.device
        self.n = self.adapter.n
        # A reused task (one resident model for several runs) must start every run from
        # the same initial adapter, not from the previous run's trained one.
        if getattr(self.task, "initial_vector", None) is None:
            self.task.initial_vector = self.adapter.vector.detach().clone()
        self.P = self.task.initial_vector.clone()  # the server vector
        self.server = ServerOptimizer(cfg.server, self.n, self.device)
        self.method = build_method(cfg, self.adapter)
        self.method.setup(len(self.task.data.clients))
        self.ledger = Ledger()
        if cfg.dp.enabled:
            d = cfg.dp
            validate_privacy_config(
                sampling=cfg.sampling, population=len(self.eligible),
                cohort_size=self.cohort_size, noise_multiplier=d.noise_multiplier,
                delta=d.delta, rounds=cfg.rounds, noise_cohort_size=d.noise_cohort_size,
                clip_norm=d.clip, accountant=None if d.accountant == "auto" else d.accountant,
                prefix="dp.")
        self.round = 0
        self.drop_reasons: dict[int, str] = {}  # this round's dropped clients -> why
        # Test hook: rewrite a client's upload bytes (e.g. corrupt them) before decoding.
        self.tamper: Callable[[int, int, bytes], bytes] | None = None
        self._down: tuple | None = None  # this round's download, see _download
        self.bar = None
        if resume:
            self._restore()
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
            (self.out / "layout.json").write_text(self.adapter.layout_json())

    @property
    def finished(self) -> bool:
        return self.round >= self.cfg.rounds

    # ---------------------------------------------------------------- one round

    def open_round(self) -> tuple[int, list[ClientTask]]:
        """Sample round t's cohort and write each client's instruction."""
        t = self.round + 1
        self._start, self._t = time.perf_counter(), t
        self.ledger.start_round()
        cohort = [int(c) for c in self.sample(t)]
        self.method.begin_round(self.P, t)
        self.method.cohort_sampled(t, cohort)
        return t, [self.instruction(t, c) for c in cohort]

    def instruction(self, t: int, c: int) -> ClientTask:
        cfg, m = self.cfg, self.method
        values = cfg.comm.down_values or cfg.comm.values
        down = self._download(m.download_mask(self.P, t, c), values, m.down_implicit(c))
        cl = cfg.client
        return ClientTask(
            round=t, client=c, seed=cfg.seed, method=cfg.method.name, n=self.n,
            train={"lr": cl.lr, "momentum": cl.momentum, "batch_size": cl.batch_size,
                   "epochs": cl.epochs, "max_steps": cl.max_steps},
            options=m.options(t, c), payloads={"down": down, **m.extra_payloads(self.P, t, c)},
            up_values=cfg.comm.up_values or cfg.comm.values, down_values=values)

    def close_round(self, t: int, tasks: list[ClientTask],
                    results: list[ClientResult | str], extra: dict | None = None) -> dict:
        """Decode every reply, aggregate, step, evaluate and record round t. `extra`: a
        driver's own fields for the metrics row (fedlora.flower: Flower message bytes)."""
        cfg = self.cfg
        self.drop_reasons = {}
        updates, weights, dropped, losses, done = [], [], [], [], []
        for ct, res in zip(tasks, results):
            decoded = self.receive(ct, res)
            if decoded is None:
                dropped.append(ct.client)
                continue
            done.append(ct.client)
            updates.append(decoded)
            weights.append(res.stats["num_examples"])
            losses.append(res.stats["train_loss"])
        self.dp_round: dict = {}
        g = self.aggregate(t, updates, weights, done)
        if g is not None:
            self.server.step(self.P, g, self.method.step_mask(t))
        self.method.end_round(self.P, t)
        row = {"round": t, "clients": len(tasks), "aggregated": len(updates),
               "upload_bytes": self.ledger.round_upload,
               "download_bytes": self.ledger.round_download,
               "cum_upload_bytes": self.ledger.cum_upload,
               "cum_download_bytes": self.ledger.cum_download,
               "train_loss": float(np.mean(losses)) if losses else None}
        if dropped:
            row["dropped"] = dropped
            row["dropped_reasons"] = {str(c): self.drop_reasons[c] for c in dropped}
        row.update(self.dp_round)
        row.update(extra or {})
        row["wall_s"] = time.perf_counter() - self._start
        if t % cfg.eval_every == 0 or t == cfg.rounds:
            row.update(self.evaluate())
            if cfg.dp.enabled:
                report = self.privacy(t)
                row.update(epsilon=report.epsilon, delta=report.delta)
        self.round = t
        rundir.append_jsonl(self.out / "ledger.jsonl", self.ledger.rows)
        rundir.append_jsonl(self.out / "metrics.jsonl", [row])
        every = cfg.checkpoint_every or cfg.eval_every
        if t % every == 0 or t == cfg.rounds:
            self.checkpoint()
        return row

    def receive(self, ct: ClientTask, res: ClientResult | str) -> torch.Tensor | None:
        """Count a reply's bytes and decode its upload; None drops the client (logged)."""
        t, c, m = ct.round, ct.client, self.method
        if isinstance(res, str):  # no reply: the client's download still crossed the wire
            self.ledger.record(t, c, upload=0, download=ct.nbytes)
            log.warning("round %d: dropped client %d: %s", t, c, res)
            self.drop_reasons[c] = res
            return None
        up = res.upload if self.tamper is None else self.tamper(t, c, res.upload)
        self.ledger.record(t, c, upload=len(up), download=ct.nbytes)
        reason = m.receive(t, c, res.stats)
        if reason is None:
            try:
                return self._receive(up, m.upload_mask(t, c))
            except codec.CodecError as e:
                reason = f"its upload failed to decode: {e}"
        log.warning("round %d: dropped client %d, %s", t, c, reason)
        self.drop_reasons[c] = reason
        return None

    def _download(self, mask: torch.Tensor | None, values: str, implicit: bool) -> bytes:
        """The download payload. P does not move within a round and encoding is
        deterministic, so clients sent the same mask get the same bytes: encode once per
        round, not once per client (a masked 22.7M-entry backbone costs ~2.5 s per encode).
        Keyed on P's identity and version."""
        key = (id(self.P), self.P._version, values, implicit)
        hit = self._down
        if hit is not None and hit[0] == key and _same_mask(hit[1], mask):
            return hit[2]
        payload = self._send(self.P, mask, values, implicit)
        self._down = (key, None if mask is None else mask.clone(), payload)
        return payload

    def _send(self, v: torch.Tensor, mask: torch.Tensor | None, values: str,
              implicit: bool) -> bytes:
        """Encode v (entries in mask). With implicit positions both ends already know the
        mask (a HetLoRA rank, a server-dictated pruning mask): only the values travel."""
        if implicit and mask is not None:
            return codec.encode(v[mask], None, values=values)
        return codec.encode(v, mask, values=values)

    def _receive(self, payload: bytes, mask: torch.Tensor | None) -> torch.Tensor:
        """Decode an upload: values only at `mask` when the server knows it, else positioned."""
        max_bytes = self.cfg.comm.max_bytes
        if mask is not None:
            out = torch.zeros(self.n, device=self.device)
            out[mask] = codec.decode(payload, int(mask.sum()), max_bytes=max_bytes).to(self.device)
            return out
        return codec.decode(payload, self.n, max_bytes=max_bytes).to(self.device)

    def aggregate(self, t: int, updates: list[torch.Tensor], weights: list[int],
                  clients: list[int] | None = None) -> torch.Tensor | None:
        """The pseudo-gradient: a plain (weighted) mean, or DP's clip-sum-noise-divide."""
        dp = self.cfg.dp
        if dp.enabled:  # noise even when nobody answered: an empty round must not show
            g, info = privatize(updates, clip_norm=dp.clip, noise_multiplier=dp.noise_multiplier,
                                generator=torch_generator(self.cfg.seed, "dp_noise", t,
                                                          device=self.device),
                                cohort_size=self.cohort_size,
                                noise_cohort_size=dp.noise_cohort_size, template=self.P)
            # What a user tunes C from: how many updates the clip touched, and their norms.
            self.dp_round = {"dp_clipped_fraction": info["clipped_fraction"],
                             "dp_update_norm_median": float(np.median(info["norms"]))
                             if info["norms"] else None}
            return g
        if not updates:
            return None
        custom = self.method.aggregate(updates, clients, weights, self.P)
        if custom is not None:
            return custom
        return weighted_mean(updates, weights if self.cfg.server.weighted else None)

    @property
    def eligible(self) -> np.ndarray:
        """Clients that may be sampled: non-empty, and allowed by the method."""
        return self.method.eligible(self.task.data.eligible)

    @property
    def cohort_size(self) -> int:
        """m: the fixed cohort size, or the expected one (q N) under Poisson sampling."""
        return min(self.cfg.clients_per_round, len(self.eligible))

    def privacy(self, rounds: int) -> EpsilonReport:
        dp = self.cfg.dp
        return epsilon(noise_multiplier=dp.noise_multiplier, rounds=rounds,
                       sampling=self.cfg.sampling, population=len(self.eligible),
                       cohort_size=self.cohort_size, delta=dp.delta,
                       noise_cohort_size=dp.noise_cohort_size,
                       accountant=None if dp.accountant == "auto" else dp.accountant)

    def sample(self, t: int) -> np.ndarray:
        """Uniformly without replacement among non-empty clients, from the sampling stream."""
        eligible = self.eligible
        rng = np_rng(self.cfg.seed, "sampling", t)
        if self.cfg.sampling == "poisson":  # each client joins independently with prob q
            return eligible[rng.random(len(eligible)) < self.cohort_size / len(eligible)]
        return rng.choice(eligible, size=self.cohort_size, replace=False)

    def evaluate(self) -> dict[str, float]:
        start = time.perf_counter()
        self.adapter.load_(self.P)
        metrics = self.task.evaluate(self.task.model, self.task.data.test,
                                     self.cfg.eval_batch_size, self.device)
        for name, vector in self.method.eval_vectors(self.P).items():  # e.g. per-tier models
            self.adapter.load_(vector)
            sub = self.task.evaluate(self.task.model, self.task.data.test,
                                     self.cfg.eval_batch_size, self.device)
            metrics.update({f"{name}/{k}": v for k, v in sub.items()})
        return {**metrics, "eval_s": time.perf_counter() - start}

    # ---------------------------------------------------------------- state

    def checkpoint(self) -> None:
        tensors = {"P": self.P, **self.server.state_tensors(), **{
            f"method.{k}": v for k, v in self.method.state_tensors().items()}}
        meta = {"round": self.round, "server_steps": self.server.step_count,
                "cum_upload_bytes": self.ledger.cum_upload,
                "cum_download_bytes": self.ledger.cum_download,
                "method": self.method.state_json(), "n": self.n}
        rundir.save_checkpoint(self.out, tensors, meta)

    def _restore(self) -> None:
        tensors, meta = rundir.load_checkpoint(self.out)
        if meta["n"] != self.n:
            raise rundir.RunDirError(f"checkpoint has n={meta['n']}, this model n={self.n}")
        self.P.copy_(tensors["P"])
        self.server.load_state(tensors, meta["server_steps"])
        self.method.load_state({k[7:]: v.to(self.device) for k, v in tensors.items()
                                if k.startswith("method.")}, meta["method"])
        self.ledger.cum_upload = meta["cum_upload_bytes"]
        self.ledger.cum_download = meta["cum_download_bytes"]
        self.round = meta["round"]
        for name in ("metrics.jsonl", "ledger.jsonl"):
            rundir.truncate_jsonl(self.out / name, self.round)

    def write_summary(self) -> dict:
        rows = rundir.read_jsonl(self.out / "metrics.jsonl")
        evals = [r for r in rows if self.task.utility in r]
        final = {k: v for k, v in (evals[-1] if evals else {}).items()
                 if k not in ("round", "clients", "aggregated", "dropped", "dropped_reasons",
                              "nodes", "late_replies")}
        summary = {
            "finished": self.round >= self.cfg.rounds, "rounds": self.round,
            "utility": self.task.utility,
            "final": {k: final[k] for k in final if not k.endswith("_bytes")},
            "best": (max if getattr(self.task, "higher_is_better", True) else min)(
                (r[self.task.utility] for r in evals), default=None),
            "higher_is_better": getattr(self.task, "higher_is_better", True),
            "total_upload_bytes": self.ledger.cum_upload,
            "total_download_bytes": self.ledger.cum_download,
            "dropped_uploads": sum(len(r.get("dropped", [])) for r in rows),
            "wall_s": float(sum(r["wall_s"] for r in rows)),
            "num_params": self.n, "dense_float32_bytes": 4 * self.n,
            "num_clients": len(self.task.data.clients),
            "empty_clients": self.task.data.empty_clients,
            "sampling": self.cfg.sampling,
        }
        if self.cfg.dp.enabled:
            summary["privacy"] = self.privacy(self.round).to_dict()
        rundir.write_json(self.out / "summary.json", summary)
        from safetensors.torch import save_file

        self.adapter.load_(self.P)
        save_file({e.name: self.P[e.slice].view(e.shape).detach().cpu().contiguous()
                   for e in self.adapter.layout}, str(self.out / "adapter.safetensors"))
        return summary


class Simulation(RoundServer):
    """One federated run in `out`, both halves in this process: `Simulation(cfg, out).run()`
    returns the summary. Client-held state lives in `out/clients/` (fedlora.client.store)."""

    def __init__(self, cfg: Config, out: str | Path, *, resume: bool = False,
                 progress: bool = True, task=None):
        super().__init__(cfg, out, resume=resume, progress=progress, task=task)
        self.runner = ClientRunner(self.task, ClientStore(self.out / "clients"))
        if resume:
            self.runner.store.rollback(self.round)

    @classmethod
    def resume(cls, out: str | Path, rounds: int | None = None, **kw) -> Simulation:
        import yaml

        data = yaml.safe_load((Path(out) / "config.yaml").read_text())
        if rounds is not None:
            data["rounds"] = rounds
        sim = cls(config_from_dict(data), out, resume=True, **kw)
        if rounds is not None:
            sim.cfg.save(sim.out / "config.yaml")
        return sim

    def run(self) -> dict:
        """The loop: server half -> instructions -> client halves -> replies -> server half."""
        cfg = self.cfg
        bar = tqdm(total=cfg.rounds, initial=self.round, disable=not self.progress,
                   desc=f"{cfg.method.name} r={cfg.model.rank}", unit="round", leave=False)
        while not self.finished:
            t, tasks = self.open_round()
            results = self.runner.run_many(tasks)
            row = self.close_round(t, tasks, results)
            if self.task.utility in row:
                bar.set_postfix({self.task.utility: f"{row[self.task.utility]:.3f}",
                                 "up": f"{self.ledger.cum_upload / 1e6:.1f}MB"})
            bar.update(1)
        bar.close()
        return self.write_summary()

    def client_round(self, t: int, c: int) -> tuple[torch.Tensor | None, dict]:
        """One client's whole exchange in round t (benchmarks time this): instruction,
        client half, reply; returns what the server decoded (None: dropped) and the stats."""
        ct = self.instruction(t, c)
        res = self.runner.run(ct)
        return self.receive(ct, res), res.stats

    def checkpoint(self) -> None:
        super().checkpoint()
        self.runner.store.commit(self.round)


def run(cfg: Config, out: str | Path, **kw) -> dict:
    """Run `cfg` into run directory `out` and return its summary."""
    return Simulation(cfg, out, **kw).run()


def _same_mask(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(torch.equal(a, b))  # a method may edit its mask in place

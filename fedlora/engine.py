"""The round loop: sample, download, train, upload, aggregate, evaluate, checkpoint.

What the server aggregates is exactly what it decoded from the bytes each client
sent; the ledger counts `len(bytes)`. One resident model; clients differ only by
the flat vector swapped into it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fedlora import hooks, rundir  # [hf-hook]
from fedlora.comm import codec
from fedlora.comm.ledger import Ledger
from fedlora.config import Config, config_from_dict
from fedlora.data.federated import client_batches
from fedlora.methods import build_method
from fedlora.model.flat import FlatAdapter
from fedlora.privacy import EpsilonReport, epsilon, privatize, validate_privacy_config
from fedlora.rng import np_rng, torch_generator, torch_seed
from fedlora.server.aggregate import weighted_mean
from fedlora.server.optim import ServerOptimizer
from fedlora.tasks import build_task

log = logging.getLogger("fedlora")


class Simulation:
    """One federated run in `out`. `Simulation(cfg, out).run()` returns the summary."""

    def __init__(self, cfg: Config, out: str | Path, *, resume: bool = False,
                 progress: bool = True, task=None):
        self.cfg, self.progress = cfg, progress
        self.out = rundir.prepare(Path(out), resume, create=False)
        self.task = task if task is not None else build_task(cfg)
        self.device = next(self.task.model.parameters()).device
        self.adapter = FlatAdapter(self.task.model)
        self.n = self.adapter.n
        # A reused task (one resident model for several runs) must start every run from
        # the same initial adapter, not from the previous run's trained one.
        if getattr(self.task, "initial_vector", None) is None:
            self.task.initial_vector = self.adapter.vector.detach().clone()
        self.P = self.task.initial_vector.clone()  # the server vector
        self.server = ServerOptimizer(cfg.server, self.n, self.device)
        self.method = build_method(cfg, self.adapter)
        self.method.setup(self.task.data)
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
        # Test hook: rewrite a client's upload bytes (e.g. corrupt them) before decoding.
        self.tamper: Callable[[int, int, bytes], bytes] | None = None
        self._down: tuple | None = None  # this round's download, see _download
        if resume:
            self._restore()
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
            (self.out / "layout.json").write_text(self.adapter.layout_json())

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

    # ---------------------------------------------------------------- the loop

    def run(self) -> dict:
        cfg = self.cfg
        bar = tqdm(total=cfg.rounds, initial=self.round, disable=not self.progress,
                   desc=f"{cfg.method.name} r={cfg.model.rank}", unit="round", leave=False)
        while self.round < cfg.rounds:
            t = self.round + 1
            start = time.perf_counter()
            self.ledger.start_round()
            cohort = self.sample(t)
            self.method.begin_round(self.P, t)
            self.method.cohort_sampled(t, [int(c) for c in cohort])
            updates, weights, dropped, losses, done = [], [], [], [], []
            for c in cohort:
                decoded, stats = self.client_round(t, int(c))
                if decoded is None:
                    dropped.append(int(c))
                    continue
                done.append(int(c))
                updates.append(decoded)
                weights.append(len(self.task.data.clients[c]))
                losses.append(stats["train_loss"])
            self.dp_round: dict = {}
            g = self.aggregate(t, updates, weights, done)
            if g is not None:
                self.server.step(self.P, g, self.method.step_mask(t))
            self.method.end_round(self.P, t)
            row = {"round": t, "clients": len(cohort), "aggregated": len(updates),
                   "upload_bytes": self.ledger.round_upload,
                   "download_bytes": self.ledger.round_download,
                   "cum_upload_bytes": self.ledger.cum_upload,
                   "cum_download_bytes": self.ledger.cum_download,
                   "train_loss": float(np.mean(losses)) if losses else None}
            if dropped:
                row["dropped"] = dropped
            row.update(self.dp_round)
            row["wall_s"] = time.perf_counter() - start
            if t % cfg.eval_every == 0 or t == cfg.rounds:
                row.update(self.evaluate())
                if cfg.dp.enabled:
                    report = self.privacy(t)
                    row.update(epsilon=report.epsilon, delta=report.delta)
                bar.set_postfix({self.task.utility: f"{row.get(self.task.utility, 0):.3f}",
                                 "up": f"{self.ledger.cum_upload / 1e6:.1f}MB"})
            self.round = t
            rundir.append_jsonl(self.out / "ledger.jsonl", self.ledger.rows)
            rundir.append_jsonl(self.out / "metrics.jsonl", [row])
            hooks.round_end(self, row)  # [hf-hook] sinks (log.*) + best round's adapter
            every = cfg.checkpoint_every or cfg.eval_every
            if t % every == 0 or t == cfg.rounds:
                self.checkpoint()
            bar.update(1)
        bar.close()
        summary = self.write_summary()
        hooks.run_end(self)  # [hf-hook] close sinks, export RUN/export (fedlora.export)
        return summary

    def client_round(self, t: int, c: int) -> tuple[torch.Tensor | None, dict]:
        """Download, train and upload for client c; returns what the server decoded."""
        cfg, comm, m = self.cfg, self.cfg.comm, self.method
        down_mask = m.client_download_mask(self.P, t, c)
        down, received = self._download(down_mask, comm.down_values or comm.values,
                                        m.implicit_positions("down", c))
        P_i = m.client_start(received, t)
        self.adapter.load_(P_i)
        torch.manual_seed(torch_seed(cfg.seed, "dropout", t, c))
        batches = client_batches(self.task.data.clients[c], cfg.client.batch_size,
                                 cfg.client.epochs, cfg.client.max_steps,
                                 np_rng(cfg.seed, "data_order", t, c))
        stats = self._train(batches, m.client_train_mask(self.P, t, c), m.local_penalty(t, c))
        m.client_done(t, c, P_i, self.adapter.vector, stats)
        delta = P_i - self.adapter.vector
        up_mask = m.client_upload_mask(delta, t, c)
        up = self._send(delta, up_mask, comm.up_values or comm.values,
                        m.implicit_positions("up", c))
        if self.tamper is not None:
            up = self.tamper(t, c, up)
        self.ledger.record(t, c, upload=len(up),
                           download=len(down) + m.extra_download_bytes(t, c))
        try:
            return self._receive(up, up_mask, m.implicit_positions("up", c)), stats
        except codec.CodecError as e:
            log.warning("round %d: dropped client %d, its upload failed to decode: %s", t, c, e)
            return None, stats

    def _download(self, mask: torch.Tensor | None, values: str,
                  implicit: bool) -> tuple[bytes, torch.Tensor]:
        """The download payload and what the client decodes from it. P does not move within
        a round and encoding is deterministic, so clients sent the same mask get the same
        bytes: encode and decode once per round, not once per client (a masked 22.7M-entry
        backbone costs ~2.5 s per encode + decode). Keyed on P's identity and version."""
        key = (id(self.P), self.P._version, values, implicit)
        hit = self._down
        if hit is not None and hit[0] == key and _same_mask(hit[1], mask):
            return hit[2], hit[3].clone()
        payload = self._send(self.P, mask, values, implicit)
        received = self._receive(payload, mask, implicit)
        self._down = (key, None if mask is None else mask.clone(), payload, received)
        return payload, received.clone()

    def _send(self, v: torch.Tensor, mask: torch.Tensor | None, values: str,
              implicit: bool) -> bytes:
        """Encode v (entries in mask). With implicit positions both ends already know the
        mask (a HetLoRA rank, a server-dictated pruning mask): only the values travel."""
        if implicit and mask is not None:
            return codec.encode(v[mask], None, values=values)
        return codec.encode(v, mask, values=values)

    def _receive(self, payload: bytes, mask: torch.Tensor | None, implicit: bool) -> torch.Tensor:
        max_bytes = self.cfg.comm.max_bytes
        if implicit and mask is not None:
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

    def _train(self, batches, grad_mask, penalty=None):
        from fedlora.client.train import train_client

        c = self.cfg.client
        return train_client(self.task, self.adapter, batches, lr=c.lr, momentum=c.momentum,
                            device=self.device, grad_mask=grad_mask, penalty=penalty)

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
                 if k not in ("round", "clients", "aggregated", "dropped")}
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


def run(cfg: Config, out: str | Path, **kw) -> dict:
    """Run `cfg` into run directory `out` and return its summary."""
    return Simulation(cfg, out, **kw).run()


def _same_mask(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(torch.equal(a, b))  # a method may edit its mask in place

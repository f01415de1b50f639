"""Client-held state: what stays on a client between the rounds it is sampled.

Cross-device clients hold nothing between rounds unless a method documents it (stacking's
merged weights, a personal adapter). In-process, each client's state is one safetensors
file per generation under `RUN/clients/`, loaded only when that client is sampled, so
memory stays O(cohort) however large the population. Generations carry the round that
wrote them: resuming from a checkpoint of round R drops every generation newer than R
(`rollback`), and a checkpoint of round R keeps, per client, only the newest generation at
or before R (`commit`), so a resumed run sees exactly the state an uninterrupted one did.
Nothing is pickled. In Flower the same state lives in the ClientApp's context (fedlora.flower).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^c(\d+)\.r(\d+)\.safetensors$")


class ClientStore:
    """Per-client tensors by name; `None` root keeps them in memory (tests, one-off runs)."""

    def __init__(self, root: Path | None):
        self.root = root
        self._mem: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}

    def _generations(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        if self.root is None or not self.root.exists():
            return out
        for f in self.root.iterdir():
            m = _NAME.match(f.name)
            if m:
                out.setdefault(int(m.group(1)), []).append(int(m.group(2)))
        return out

    def _path(self, client: int, round_: int) -> Path:
        assert self.root is not None
        return self.root / f"c{client}.r{round_}.safetensors"

    def load(self, client: int) -> dict[str, torch.Tensor]:
        """The client's newest state (empty if it never saved any)."""
        if self.root is None:
            return {k: v.clone() for k, v in self._mem.get(client, (0, {}))[1].items()}
        rounds = [r for r in (self._generations_of(client))]
        if not rounds:
            return {}
        return load_file(str(self._path(client, max(rounds))))

    def _generations_of(self, client: int) -> list[int]:
        if self.root is None or not self.root.exists():
            return []
        prefix = f"c{client}.r"
        return [int(m.group(2)) for f in self.root.iterdir()
                if f.name.startswith(prefix) and (m := _NAME.match(f.name))]

    def save(self, client: int, round_: int, tensors: dict[str, torch.Tensor]) -> None:
        """Store the client's state as of the end of `round_` (atomically)."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        if self.root is None:
            self._mem[client] = (round_, {k: v.clone() for k, v in tensors.items()})
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(client, round_)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)

    def rollback(self, round_: int) -> None:
        """Forget every generation written after round `round_` (resume from its checkpoint)."""
        if self.root is None:
            self._mem = {c: v for c, v in self._mem.items() if v[0] <= round_}
            return
        for client, rounds in self._generations().items():
            for r in rounds:
                if r > round_:
                    self._path(client, r).unlink()

    def commit(self, round_: int) -> None:
        """After a checkpoint of round `round_`: keep per client its newest generation <= it
        (and any newer ones), drop the older ones."""
        if self.root is None:
            return
        for client, rounds in self._generations().items():
            kept = [r for r in rounds if r <= round_]
            for r in sorted(kept)[:-1]:
                self._path(client, r).unlink()

"""Client-held state: what stays on a client between the rounds it is sampled.

Cross-device clients hold nothing between rounds unless a method documents it (stacking's
merged weights, a personal adapter). In-process, each client's state is one safetensors
file per generation under `RUN/clients/`, loaded only when that client is sampled, so
memory stays O(cohort) however large the population. Generations carry the round that
wrote them: resuming from a checkpoint of round R drops every generation newer than R
(`rollback`), and a checkpoint of round R keeps, per client, only the newest generation at
or before R (`commit`), so a resumed run sees exactly the state an uninterrupted one did.
Nothing is pickled. On Flower each SuperNode keeps its own ClientStore folder
(fedlora.flower.clientapp.state_dir).
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
        self._index: dict[int, set[int]] | None = None  # client -> rounds on disk

    def _generations(self) -> dict[int, set[int]]:
        """Each client's generations on disk: the folder is listed once, then kept in step
        (a load must not scan a folder holding every client's files)."""
        if self._index is None:
            self._index = {}
            if self.root is not None and self.root.exists():
                for f in self.root.iterdir():
                    m = _NAME.match(f.name)
                    if m:
                        self._index.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        return self._index

    def _path(self, client: int, round_: int) -> Path:
        assert self.root is not None
        return self.root / f"c{client}.r{round_}.safetensors"

    def load(self, client: int) -> dict[str, torch.Tensor]:
        """The client's newest state (empty if it never saved any)."""
        if self.root is None:
            return {k: v.clone() for k, v in self._mem.get(client, (0, {}))[1].items()}
        rounds = self._generations().get(client)
        if not rounds:
            return {}
        return load_file(str(self._path(client, max(rounds))))

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
        self._generations().setdefault(client, set()).add(round_)

    def rollback(self, round_: int) -> None:
        """Forget every generation written after round `round_` (resume from its checkpoint)."""
        if self.root is None:
            self._mem = {c: v for c, v in self._mem.items() if v[0] <= round_}
            return
        for client, rounds in self._generations().items():
            for r in [r for r in rounds if r > round_]:
                self._path(client, r).unlink()
                rounds.discard(r)

    def commit(self, round_: int) -> None:
        """After a checkpoint of round `round_`: keep per client its newest generation <= it
        (and any newer ones), drop the older ones."""
        if self.root is None:
            return
        for client, rounds in self._generations().items():
            kept = [r for r in rounds if r <= round_]
            for r in sorted(kept)[:-1]:
                self._path(client, r).unlink()
                rounds.discard(r)

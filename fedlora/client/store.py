"""Client-held state: what stays on a client between the rounds it is sampled.

Cross-device clients hold nothing between rounds unless a method documents it (stacking's
merged weights, a personal adapter). In-process, each client's state is one safetensors
file per generation under `RUN/clients/`, loaded only when that client is sampled, so
memory stays O(cohort) however large the population. Generations carry the round that
wrote them: resuming from a checkpoint of round R drops every generation newer than R
(`rollback`), and a checkpoint of round R keeps, per client, only the newest generation at
or before R (`commit`), so a resumed run sees exactly the state an uninterrupted one did.
On Flower the same generations (the same safetensors bytes) live in the ClientApp's own
`context.state`, which the SuperNode keeps for the run (fedlora.flower.clientapp), or in a
node folder where the node config asks for one. Nothing is pickled.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file

_NAME = re.compile(r"^c(\d+)\.r(\d+)\.safetensors$")


class ClientStore:
    """Per-client tensors by name. `root` is a folder (one file per client and generation),
    a mapping of those file names to their bytes (a Flower ConfigRecord in
    `context.state`), or None: in memory (tests, one-off runs)."""

    def __init__(self, root: Path | MutableMapping[str, bytes] | None):
        self.root = root
        # In memory: the same bytes a record holds, so all three behave the same.
        self._record = root if isinstance(root, MutableMapping) else {} if root is None \
            else None
        self._index: dict[int, set[int]] | None = None  # client -> rounds on disk

    def _generations(self) -> dict[int, set[int]]:
        """Each client's generations on disk: the folder is listed once, then kept in step
        (a load must not scan a folder holding every client's files)."""
        if self._index is None:
            self._index = {}
            if self._record is not None:
                names = list(self._record)
            elif self.root is not None and self.root.exists():
                names = [f.name for f in self.root.iterdir()]
            else:
                names = []
            for name in names:
                if m := _NAME.match(name):
                    self._index.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        return self._index

    def _path(self, client: int, round_: int) -> Path:
        assert isinstance(self.root, Path)
        return self.root / f"c{client}.r{round_}.safetensors"

    def _drop(self, client: int, round_: int) -> None:
        if self._record is not None:
            del self._record[f"c{client}.r{round_}.safetensors"]
        else:
            self._path(client, round_).unlink()

    def load(self, client: int) -> dict[str, torch.Tensor]:
        """The client's newest state (empty if it never saved any)."""
        rounds = self._generations().get(client)
        if not rounds:
            return {}
        if self._record is not None:
            return load(bytes(self._record[f"c{client}.r{max(rounds)}.safetensors"]))
        return load_file(str(self._path(client, max(rounds))))

    def save(self, client: int, round_: int, tensors: dict[str, torch.Tensor]) -> None:
        """Store the client's state as of the end of `round_` (atomically)."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        if self._record is not None:
            self._record[f"c{client}.r{round_}.safetensors"] = save(tensors)
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self._path(client, round_)
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, path)
        self._generations().setdefault(client, set()).add(round_)

    def rollback(self, round_: int) -> None:
        """Forget every generation written after round `round_` (resume from its checkpoint)."""
        for client, rounds in self._generations().items():
            for r in [r for r in rounds if r > round_]:
                self._drop(client, r)
                rounds.discard(r)

    def commit(self, round_: int) -> None:
        """After a checkpoint of round `round_`: keep per client its newest generation <= it
        (and any newer ones), drop the older ones."""
        for client, rounds in self._generations().items():
            kept = [r for r in rounds if r <= round_]
            for r in sorted(kept)[:-1]:
                self._drop(client, r)
                rounds.discard(r)

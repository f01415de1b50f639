"""Per-client method state that stays O(clients touched), not O(population).

A method's per-client value is usually a rule of the client's seed-derived attributes
(a tier's rank) or "never seen"; only the clients a run has sampled depart from it. At a
population of 100,000 the departures are a few hundred, so only they are stored (and
checkpointed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


class ClientValues:
    """A length-N vector equal to `default(ids)` except where assigned.

    Reads take an int (returns a scalar) or an index array (returns an array); writes take
    the same and store only the written entries."""

    def __init__(self, n: int, default: Callable[[np.ndarray], np.ndarray] | float | int,
                 dtype: type = np.float64):
        self.n, self.dtype = int(n), np.dtype(dtype)
        self._default = default
        self._set: dict[int, float | int] = {}

    def __len__(self) -> int:
        return self.n

    def _ids(self, key) -> np.ndarray:
        ids = np.asarray(key, dtype=np.int64)
        ids = np.where(ids < 0, ids + self.n, ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n):
            raise IndexError(f"client id out of range (population {self.n}): {key}")
        return ids

    def defaults(self, ids: np.ndarray) -> np.ndarray:
        """The rule's values for `ids`, ignoring assignments."""
        if callable(self._default):
            return np.asarray(self._default(ids), dtype=self.dtype)
        return np.full(ids.shape, self._default, dtype=self.dtype)

    def __getitem__(self, key):
        ids = self._ids(key)
        out = self.defaults(ids.reshape(-1))
        for j, c in enumerate(ids.reshape(-1).tolist()):
            if c in self._set:
                out[j] = self._set[c]
        return out[0].item() if ids.ndim == 0 else out.reshape(ids.shape)

    def __setitem__(self, key, value) -> None:
        ids = self._ids(key).reshape(-1)
        values = np.broadcast_to(np.asarray(value, dtype=self.dtype), ids.shape)
        for c, v in zip(ids.tolist(), values.tolist()):
            self._set[c] = v

    def items(self) -> Iterator[tuple[int, float | int]]:
        """The assigned (client, value) pairs, by client id."""
        return iter(sorted(self._set.items()))

    def to_json(self) -> dict[str, float | int | None]:
        """Assigned entries only, keyed by client id; non-finite floats as None."""
        return {str(c): (v if not isinstance(v, float) or np.isfinite(v) else None)
                for c, v in self.items()}

    def load_json(self, data: dict | list, missing: float | int) -> None:
        """Restore from `to_json` (or an older checkpoint's dense list); None reads `missing`."""
        self._set.clear()
        if isinstance(data, list):  # a dense vector from before sparse state: keep departures
            values = np.array([missing if x is None else x for x in data], dtype=self.dtype)
            ids = np.arange(len(values))
            moved = np.flatnonzero(values != self.defaults(ids))
            self[moved] = values[moved]
            return
        for c, v in data.items():
            self[int(c)] = missing if v is None else v

"""The communication ledger: bytes that actually crossed the wire."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Ledger:
    """Per-client, per-round byte counts; totals are what every plot uses."""

    cum_upload: int = 0
    cum_download: int = 0
    rows: list[dict] = field(default_factory=list)  # this round's per-client rows

    def start_round(self) -> None:
        self.rows = []

    def record(self, round_: int, client: int, upload: int, download: int) -> None:
        self.rows.append(
            {"round": round_, "client": client, "upload_bytes": upload, "download_bytes": download}
        )
        self.cum_upload += upload
        self.cum_download += download

    @property
    def round_upload(self) -> int:
        return sum(r["upload_bytes"] for r in self.rows)

    @property
    def round_download(self) -> int:
        return sum(r["download_bytes"] for r in self.rows)

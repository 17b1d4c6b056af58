"""Who looked at what: every access to patient data through the web port (DICOMweb queries, retrievals, views, and
STOW-RS stores), one JSON line each, for the audit trail to turn into IHE ATNA "Query" and "DICOM Instances
Accessed" messages.

The events name the user, the address, the studies and, for a query, its parameters (a search by patient name
holds the name): that is why they are kept apart from the operational log, in `D:/state/access/<day>.jsonl`,
readable only by the gateway's user (0600), and never logged, counted in a metric or shown in monitoring.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path


class AccessEvents:
    """An append-only file per day of access events."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._day = ""
        self._fd = -1  # the current day's file, kept open (one write per event, no open/close)

    def record(
        self,
        kind: str,
        user: str,
        remote: str,
        studies: Iterable[str],
        instances: int = 0,
        query: dict[str, str] | None = None,
        now: float | None = None,
    ) -> None:
        """Append one event (kind: query, retrieve, metadata, view, store)."""
        at = time.time() if now is None else now
        event = {
            "at": round(at, 3),
            "kind": kind,
            "user": user,
            "remote": remote,
            "studies": sorted(set(studies)),
            "instances": instances,
        }
        if query:
            event["query"] = query
        line = (json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        day = time.strftime("%Y-%m-%d", time.gmtime(at))
        with self._lock:
            if day != self._day:
                self.close()
                self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._fd = os.open(
                    self.folder / f"{day}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
                )
                self._day = day
            os.write(self._fd, line)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._day = -1, ""

    def read(self, day: str) -> list[dict[str, object]]:
        """One day's events (tests, and the audit issue's queries)."""
        path = self.folder / f"{day}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

"""The DICOMweb index (for QIDO-RS and the viewer): each stored instance's header attributes, read in the
background, off the acknowledgement path: receiving and ingesting never wait for it, and a query sees an instance
a moment after it is stored. An unreadable header is indexed by the UIDs the catalog already has. The instance's
DICOMweb metadata (DICOM JSON) is made here too, into `D:/state/webmeta/`, so that a series' metadata is read,
not built, when a viewer asks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from gateway import imaging
from gateway.core import qido
from gateway.stages.context import Stage

log = logging.getLogger(__name__)

# index column → (DICOM keyword, longest value kept: the column's size; 0 for a number): every indexed attribute
# but the three UIDs the catalog already has
HEADER = {
    a.column: (a.keyword, a.size)
    for a in qido.INDEXED
    if a.column not in ("sop_uid", "study_uid", "series_uid")
}


def read_header(path: Path, known: dict[str, str]) -> dict[str, Any]:
    """The index row of one stored file (the catalog's UIDs where the header cannot be read)."""
    import pydicom

    row: dict[str, Any] = {k: known[k] for k in ("sop_uid", "study_uid", "series_uid", "sop_class_uid")}
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # whatever pydicom makes of a file it cannot read: the UIDs still index it
        log.info("DICOMweb index: header of %s unreadable (%s)", known["sop_uid"], type(exc).__name__)
        return row
    for column, (keyword, size) in HEADER.items():
        try:
            value = ds.get(keyword)
        except Exception:  # a malformed value: left empty
            value = None
        if value is None or value == "":
            continue
        if size:
            row[column] = str(value)[:size]
        else:
            with contextlib.suppress(TypeError, ValueError):
                row[column] = int(value)
    return row


class WebIndexer(Stage):
    """Fills the DICOMweb index as instances are stored."""

    async def run_once(self) -> int:
        """Index one batch of instances not yet indexed; how many."""
        batch = await self.catalog.unindexed(200)
        if not batch:
            return 0
        root = self.storage.root
        cache = root / "state" / "webmeta"

        def index(b: dict[str, str]) -> dict[str, Any]:
            row = read_header(root / b["path"], b)
            try:  # DICOMweb metadata made once here, not at every request (`imaging.metadata_cached`)
                imaging.metadata_cached(
                    root / b["path"], cache, (b["study_uid"], b["series_uid"], b["sop_uid"])
                )
            except Exception as exc:  # an unreadable header: the request makes it (or says why)
                log.info("DICOMweb metadata of %s not cached (%s)", b["sop_uid"], type(exc).__name__)
            return row

        rows = await asyncio.to_thread(lambda: [index(b) for b in batch])
        await self.catalog.add_to_web_index(rows, time.time())
        return len(rows)

    async def run_forever(self) -> None:
        """Index as instances arrive; never dies."""
        await self.work_loop(self.run_once, self.wakes.webindex)

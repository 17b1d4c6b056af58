"""The catalog: the index of studies, series, instances, transfers and mails (the files are the content).

Both backends run the same SQL (see `db.py`). Schema creation and upgrades are automatic and versioned (`schema.py`:
the `schema_version` table holds the last applied migration; `MIGRATIONS` only ever grows). The catalog is built
from rooms, one per concern, each a mixin over the shared database handle (`base.py`): instances, outbound,
receipts, inbound, forwards, de-identification, reporting (the read model for status, the web page and check_mk), snapshot (backup
and restore) and the DICOMweb index. All SQL of the gateway lives in this package.
"""

from __future__ import annotations

from gateway.catalog.cluster import Claim, ClusterRoom
from gateway.catalog.db import connect
from gateway.catalog.deid import DeidRoom
from gateway.catalog.forwards import ForwardsRoom
from gateway.catalog.inbound import InboundRoom
from gateway.catalog.instances import InstanceRecord
from gateway.catalog.outbound import OutboundRoom
from gateway.catalog.receipts import ReceiptMatch, ReceiptsRoom
from gateway.catalog.reporting import ReportingRoom
from gateway.catalog.schema import MIGRATIONS, TABLES
from gateway.catalog.snapshot import SnapshotRoom
from gateway.catalog.webindex import WebIndexRoom

__all__ = ["MIGRATIONS", "TABLES", "Catalog", "Claim", "InstanceRecord", "ReceiptMatch", "open_catalog"]


class Catalog(
    OutboundRoom,
    ReceiptsRoom,
    InboundRoom,
    ForwardsRoom,
    ReportingRoom,
    SnapshotRoom,
    WebIndexRoom,
    DeidRoom,
    ClusterRoom,
):
    """Typed operations over the catalog tables."""

    async def migrate(self) -> int:
        """Apply missing migrations in order; return the schema version now in force."""
        async with self.db.transaction() as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = await tx.fetchall("SELECT version FROM schema_version")
            if not rows:
                await tx.execute("INSERT INTO schema_version (version) VALUES (0)")
        version = int((await self.db.fetchone("SELECT version FROM schema_version"))[0])  # type: ignore[index]
        if version > len(MIGRATIONS):
            raise RuntimeError(f"catalog schema {version} is newer than this gateway ({len(MIGRATIONS)})")
        for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
            # MariaDB commits DDL implicitly; each migration is written so that re-running a half-applied one
            # fails loudly instead of silently skipping (the operator restores the backup).
            async with self.db.transaction() as tx:
                for sql in statements:
                    await tx.execute(sql)
                await tx.execute("UPDATE schema_version SET version = ?", (number,))
            version = number
        return version


async def open_catalog(url: str) -> Catalog:
    """Connect, migrate, return the catalog."""
    catalog = Catalog(await connect(url))
    await catalog.migrate()
    return catalog

"""The fast tier's two gateways: A and its partner B, whole, in this process, on the in-process mail nodes of
`tests/fakemail.py`, driven one stage step at a time (no waiting for anything: each step says what it did)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway import cli, config
from gateway.core.queue import QueueState
from gateway.core.states import TransferState
from gateway.devtools.devenv import render_config
from gateway.service import Gateway
from gateway.spool import Item
from tests import fakemail
from tests.ports import free_port


def fast_settings(
    tmp_path: Path,
    pki_dir: Path,
    fake: fakemail.FakeMail,
    name: str,
    partner: str,
    partner_extra: str = "",
    web_extra: str = "",
    smtp_nodes: list[str] | None = None,
    tail: str = "",
) -> config.Settings:
    """A gateway on the fake mail nodes, with one partner; everything else as in the dev configuration."""
    path = tmp_path / name / "gateway.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        render_config(
            name=name,
            ae_title=name.upper().replace("-", "_"),
            port=free_port(),
            d_root=tmp_path / name / "d",
            e_root=tmp_path / name / "e",
            pki_dir=pki_dir,
            partners=[(partner, partner, "TO_" + partner.upper().replace("-", "_"))],
            stability_delay=0,
            smtp_nodes=smtp_nodes or fake.smtp_nodes,
            pop3_nodes=fake.pop3_nodes,
            min_free="1MB",
            partner_extra={partner: partner_extra},
            web_extra=web_extra,
            tail=tail,
        )
    )
    return config.load(path)


async def ingest_all(gw: Gateway) -> int:
    """Ingest until the inbox has nothing new: a reassembled message/partial set comes back as a mail of its own
    (bounded: a set of fragments needs two rounds)."""
    total = 0
    for _ in range(5):
        done = await gw.ingester.run_once()
        if not done:
            return total
        total += done
    raise AssertionError("the inbox keeps producing work")


class Pair:
    """Gateway A and its partner B, driven one stage step at a time."""

    def __init__(self, a: Gateway, b: Gateway) -> None:
        self.a, self.b = a, b

    async def send_study(self, folder: Path) -> None:
        """What `dicom-mail-gateway send --to gateway-b FOLDER` does at A."""
        assert await cli._send(self.a.settings, "gateway-b", [str(folder)]) == 0

    async def a_packages(self, folder: Path) -> tuple[dict[str, Any], Item]:
        """The study in `folder` sent to gateway-b and packaged at A into one mail: its transfer as listed, and the
        mail waiting in A's outbox."""
        await self.send_study(folder)
        [listed] = await self.a.catalog.transfers_in_state("out", TransferState.PENDING)
        assert await self.a.packager.package_listed(listed)
        [item] = self.a.outbox.items(QueueState.INCOMING)
        return listed, item

    async def a_sends(self) -> int:
        for transfer in await self.a.catalog.transfers_in_state("out", TransferState.PENDING):
            await self.a.packager.package(transfer)
        return await self.a.sender.run_once()

    async def b_receives_and_answers(self) -> int:
        taken = await self.b.fetcher.poll_once()
        await ingest_all(self.b)
        await self.b.receipts.settle_waiting()
        await self.b.receipts.queue_due()
        await self.b.sender.run_once()
        return taken

    async def a_takes_the_receipt(self) -> int:
        taken = await self.a.fetcher.poll_once()
        await ingest_all(self.a)
        return taken

"""Stage 2, route: when a study has been quiet for `stability_delay`, open one outbound transfer per partner.

The route of each instance was decided at reception (the Called AE Title); this stage only decides *when* a
study is complete ("stable", as Orthanc calls it) and groups its routed instances into a transfer.
"""

from __future__ import annotations

import logging
import time
import uuid

from gateway.stages import wait_woken
from gateway.stages.context import Stage, StageContext

log = logging.getLogger(__name__)


class Router(Stage):
    """Turns stable studies into pending outbound transfers."""

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)

    async def run_once(self, now: float) -> int:
        """Create transfers for every study that is stable at `now`; return how many."""
        created = 0
        for study_uid, partner in await self.catalog.stable_routes(now - self.settings.stability_delay):
            transfer_id = uuid.uuid4().hex
            count = await self.catalog.create_out_transfer(transfer_id, partner, study_uid, now)
            if count:
                created += 1
                log.info(
                    "transfer %s: study %s stable, %d instances for partner %s",
                    transfer_id,
                    study_uid,
                    count,
                    partner,
                )
        if created:
            self.wakes.packager.set()
        return created

    async def run_forever(self) -> None:
        """Check on every new instance and at least every second; never dies."""
        tick = max(0.2, min(1.0, self.settings.stability_delay / 4 or 0.2))
        while True:
            await wait_woken(self.wakes.router, tick)
            try:
                await self.run_once(time.time())
                self.guard.ok()
            except Exception as exc:
                if not await self.guard.pause(exc):
                    return

"""STOW-RS (PS3.18 §10.5): a second intake beside C-STORE, with the same guarantees.

`POST /dicomweb/studies[/{study}]` stores and keeps (like a C-STORE to the gateway's own AE title);
`POST /dicomweb/aets/{AE}/studies[/{study}]` stores and routes as a C-STORE to that Called AE Title would (a
partner's `ae_title`: the study goes to that partner once complete), the way dcm4chee names its AEs in the URL.

The body (`multipart/related; type="application/dicom"`) is first received whole into temporary files on D: (at
most `web.stow_max_size`, else 413 and nothing is stored), then each part is checked (a Part 10 file with its
UIDs, of the study the URL names), stored durably (fsync, rename, fsync of the folder) and indexed in the catalog
before the response says so: a 200 names only instances that are durable and indexed, as a C-STORE success
does. Who may store: the web port's login (operator or a bearer token) from an address in
`gateway.allowed_networks` when that is set, as for DICOM.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, web

from gateway.access import AccessEvents
from gateway.catalog import InstanceRecord
from gateway.core.dicominfo import InstanceInfo, NotDicomError, read_info
from gateway.dicomweb import base_url
from gateway.storage import StoreOutcome

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

PREFIX = "/dicomweb"
# failure reasons (PS3.18 Table 10.5.3-2 and the C-STORE statuses)
NOT_DICOM, WRONG_STUDY, OUT_OF_RESOURCES, CONFLICT = 0xC000, 0xC409, 0xA700, 0xA900


class Stow:
    """The STOW-RS routes of one gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.events = AccessEvents(gw.access_log)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(f"{PREFIX}/studies", self.store),
            web.post(f"{PREFIX}/studies/{{study}}", self.store),
            web.post(f"{PREFIX}/aets/{{ae}}/studies", self.store),
            web.post(f"{PREFIX}/aets/{{ae}}/studies/{{study}}", self.store),
        ]

    def _allowed(self, request: web.Request) -> bool:
        networks = self.gw.settings.allowed_networks
        if not networks:
            return True
        try:
            ip = ipaddress.ip_address(request.remote or "")
        except ValueError:
            return False
        return any(ip in n for n in networks)

    async def store(self, request: web.Request) -> web.Response:
        settings = self.gw.settings
        if not self._allowed(request):
            return web.Response(status=403, text="this address may not store")
        route, ae = None, settings.ae_title
        if "ae" in request.match_info:
            ae = request.match_info["ae"]
            partner = next((p for p in settings.partners if p.ae_title == ae), None)
            if partner is None and ae != settings.ae_title and ae not in settings.routing.called_aes():
                return web.Response(status=404, text="no route with this AE title")
            route = partner.name if partner else None
        study = request.match_info.get("study")
        ctype = request.headers.get("Content-Type", "").lower()
        if not ctype.startswith("multipart/related") or "application/dicom" not in ctype:
            return web.Response(status=415, text='send multipart/related; type="application/dicom"')
        if request.content_length is not None and request.content_length > settings.web.stow_max_size:
            return web.Response(status=413, text=f"larger than {settings.web.stow_max_size} bytes")
        temps: list[Path | None] = []
        try:
            try:
                await self._receive(request, temps)
            except _TooLarge:
                return web.Response(status=413, text=f"larger than {settings.web.stow_max_size} bytes")
            except ValueError as exc:
                return web.Response(status=400, text=f"malformed multipart body: {str(exc)[:120]}")
            stored, failed = await self._store_all(temps, study, route, ae, request.remote or "")
        finally:
            for t in temps:
                if t is not None:
                    t.unlink(missing_ok=True)
        base = base_url(request)
        body: dict[str, Any] = {}
        if study:
            body["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{study}"]}
        if stored:
            body["00081199"] = {"vr": "SQ", "Value": [_ref(base, i) for i in stored]}
        if failed:
            body["00081198"] = {"vr": "SQ", "Value": [_failed(i, reason) for i, reason in failed]}
        status = 200 if not failed else 409 if not stored else 202
        await asyncio.to_thread(
            self.events.record,
            "store",
            str(request.get("user", "anonymous")),
            str(request.remote or ""),
            (i.study_uid for i in stored),
            len(stored),
        )
        log.info("STOW-RS: %d instances stored, %d refused", len(stored), len(failed))
        return web.Response(
            status=status, body=json.dumps(body).encode(), content_type="application/dicom+json"
        )

    async def _receive(self, request: web.Request, temps: list[Path | None]) -> None:
        """Every part into a temporary file (None for a part that is not application/dicom); bounded in total."""
        reader = await request.multipart()
        total, limit = 0, self.gw.settings.web.stow_max_size
        tmp_dir = self.gw.storage.tmp
        while True:
            part = await reader.next()
            if part is None:
                return
            if not isinstance(part, BodyPartReader):
                raise ValueError("nested multipart")
            if part.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/dicom":
                temps.append(None)
                await part.release()
                continue
            path = tmp_dir / f".stow.{os.getpid()}.{time.time_ns()}.tmp"
            temps.append(path)
            f = await asyncio.to_thread(path.open, "wb")
            try:
                while chunk := await part.read_chunk(1 << 20):
                    total += len(chunk)
                    if total > limit:
                        raise _TooLarge
                    await asyncio.to_thread(f.write, chunk)
            finally:
                f.close()

    async def _store_all(
        self, temps: list[Path | None], study: str | None, route: str | None, called_ae: str, peer: str
    ) -> tuple[list[InstanceInfo], list[tuple[InstanceInfo | None, int]]]:
        storage = self.gw.storage
        stored: list[InstanceInfo] = []
        failed: list[tuple[InstanceInfo | None, int]] = []
        records = []
        for temp in temps:
            if temp is None:
                failed.append((None, NOT_DICOM))
                continue
            try:
                info = await asyncio.to_thread(read_info, temp)
            except NotDicomError:
                failed.append((None, NOT_DICOM))
                continue
            if study and info.study_uid != study:
                failed.append((info, WRONG_STUDY))
                continue
            try:
                await asyncio.to_thread(storage.check_room)
                result = await asyncio.to_thread(storage.store_temp_file, temp, info, None)
            except OSError as exc:
                log.warning("STOW-RS: instance refused: %s", exc.strerror or type(exc).__name__)
                failed.append((info, OUT_OF_RESOURCES))
                continue
            if result.outcome is StoreOutcome.CONFLICT:
                failed.append((info, CONFLICT))
                continue
            records.append(
                InstanceRecord(
                    info,
                    storage.relative(result.path),
                    result.size,
                    result.sha256,
                    "dicom",
                    "DICOMWEB",
                    route,
                    time.time(),
                    called_ae=called_ae,
                    peer=peer,
                )
            )
            stored.append(info)
        if records:
            await self.gw.catalog.record_instances(records)  # indexed before the response names them
            self.gw.ctx.wakes.router.set()
            self.gw.ctx.wakes.webindex.set()
        return stored, failed


class _TooLarge(Exception):
    pass


def _ref(base: str, info: InstanceInfo) -> dict[str, Any]:
    url = f"{base}/studies/{info.study_uid}/series/{info.series_uid}/instances/{info.sop_instance_uid}"
    return {
        "00081150": {"vr": "UI", "Value": [info.sop_class_uid]},
        "00081155": {"vr": "UI", "Value": [info.sop_instance_uid]},
        "00081190": {"vr": "UR", "Value": [url]},
    }


def _failed(info: InstanceInfo | None, reason: int) -> dict[str, Any]:
    item: dict[str, Any] = {"00081197": {"vr": "US", "Value": [reason]}}
    if info is not None:
        item["00081150"] = {"vr": "UI", "Value": [info.sop_class_uid]}
        item["00081155"] = {"vr": "UI", "Value": [info.sop_instance_uid]}
    return item

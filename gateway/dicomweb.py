"""DICOMweb (PS3.18) on the web port, under `/dicomweb`: QIDO-RS, WADO-RS and WADO-URI, served from the catalog's
DICOMweb index (`catalog.webindex`) and the files on D:.

- QIDO-RS: `/studies`, `/series`, `/instances`, and the same below a study or series, with the matching of
  `core.qido` (single values, `*`/`?`, date and time ranges, UID lists, `includefield`, `limit`, `offset`,
  `fuzzymatching`) and two extensions: `direction=received|sent` and `partner=NAME`.
- WADO-RS: a study, series or instance as `multipart/related; type="application/dicom"`, streamed file by file
  from disk (memory holds one chunk, whatever the study's size), as stored with `transfer-syntax=*` (what
  dicomweb-client and OHIF ask for) or converted to Explicit VR Little Endian where a client asks for that;
  `metadata` as DICOM JSON with BulkDataURIs; `frames` (native, or as stored with `transfer-syntax=*`);
  `rendered` (JPEG or PNG, `window`, `viewport`, `quality`) for instances and frames; `thumbnail`; `bulkdata`.
- WADO-URI: `/dicomweb/wado?requestType=WADO&studyUID=…&seriesUID=…&objectUID=…[&contentType=…]`.

Access: the web port's login (session or HTTP basic auth; `gateway.web`), like every page. Only what the catalog
holds as stored is served (quarantined mails never reach it; conflicts kept aside are not served). UIDs are
checked before any lookup (400), unknown ones are 404, and files are found only through the catalog, never by a
name from the request. The web port keeps no access log, so no query string (a `PatientName=` search) is logged.
Decoding and rendering run in the render workers (`gateway.renderers`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from pydicom.uid import ExplicitVRLittleEndian

from gateway import imaging
from gateway.access import AccessEvents
from gateway.core import qido
from gateway.renderers import RenderFailed

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)
T = TypeVar("T")

PREFIX = "/dicomweb"
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
CHUNK = 1 << 20
DICOM_JSON = "application/dicom+json"
ROW_TTL = 30.0  # seconds an instance row is served from memory
ROW_CACHE = 20_000  # instance rows kept at most


def _uid(request: web.Request, key: str) -> str:
    value = request.match_info[key]
    if len(value) > 64 or not UID_RE.match(value):
        raise web.HTTPBadRequest(text=f"{key}: not a UID")
    return value


def _frames(text: str) -> list[int]:
    try:
        numbers = [int(f) for f in text.split(",")]
    except ValueError:
        raise web.HTTPBadRequest(text="frame numbers: a comma-separated list of numbers") from None
    if not numbers or len(numbers) > 10000 or any(n < 1 for n in numbers):
        raise web.HTTPBadRequest(text="frame numbers: 1 or more")
    return numbers


def _accept_syntax(request: web.Request, kind: str) -> str | None:
    """The transfer syntax the client asks for with `kind` (None: not said, the default applies)."""
    for item in request.headers.get("Accept", "").split(","):
        params = dict(
            (k.strip().lower(), v.strip().strip('"'))
            for k, _, v in (p.partition("=") for p in item.split(";")[1:])
        )
        if params.get("type", "").lower() == kind or item.strip().lower().startswith(kind):
            return params.get("transfer-syntax")
    return None


class DicomWeb:
    """The DICOMweb routes of one gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.events = AccessEvents(gw.access_log)
        # instance rows by SOP Instance UID, for the requests a viewer makes per image (frames, rendered): a stored
        # instance never changes under its UID; a purged one's file is gone, which the request then reports (404),
        # and an entry lives at most ROW_TTL seconds
        self._instances: dict[str, tuple[float, dict[str, Any]]] = {}

    async def record(
        self,
        request: web.Request,
        kind: str,
        rows: list[dict[str, Any]],
        query: dict[str, str] | None = None,
    ) -> None:
        """One access event (`gateway.access`): who, from where, which studies, how many instances. One small
        O_APPEND write, made here: a hop to a thread would cost more than the write."""
        self.events.record(
            kind,
            str(request.get("user", "anonymous")),
            str(request.remote or ""),
            (str(r["study_uid"]) for r in rows),
            len(rows),
            query,
        )

    def routes(self) -> list[web.RouteDef]:
        p = f"{PREFIX}/studies/{{study}}"
        s = f"{p}/series/{{series}}"
        i = f"{s}/instances/{{sop}}"
        return [
            web.get(f"{PREFIX}/studies", self.search(qido.STUDY)),
            web.get(f"{PREFIX}/series", self.search(qido.SERIES)),
            web.get(f"{PREFIX}/instances", self.search(qido.INSTANCE)),
            web.get(f"{p}/series", self.search(qido.SERIES)),
            web.get(f"{p}/instances", self.search(qido.INSTANCE)),
            web.get(f"{s}/instances", self.search(qido.INSTANCE)),
            web.get(p, self.retrieve),
            web.get(s, self.retrieve),
            web.get(i, self.retrieve),
            web.get(f"{p}/metadata", self.metadata),
            web.get(f"{s}/metadata", self.metadata),
            web.get(f"{i}/metadata", self.metadata),
            web.get(f"{i}/frames/{{frames}}", self.frames),
            web.get(f"{i}/rendered", self.rendered),
            web.get(f"{i}/frames/{{frames}}/rendered", self.rendered),
            web.get(f"{p}/thumbnail", self.thumbnail),
            web.get(f"{s}/thumbnail", self.thumbnail),
            web.get(f"{i}/thumbnail", self.thumbnail),
            web.get(f"{i}/frames/{{frames}}/thumbnail", self.thumbnail),
            web.get(f"{i}/bulkdata/{{tag}}", self.bulkdata),
        ]

    async def pixels(self, row: dict[str, Any], call: Awaitable[T]) -> T:
        """A render worker's answer (`gateway.renderers`) about this row's file; its failures as HTTP errors."""
        try:
            return await call
        except imaging.NoSuchFrame as exc:
            raise web.HTTPNotFound(text=str(exc)) from None
        except imaging.Undecodable as exc:
            raise web.HTTPNotAcceptable(text=str(exc)) from None
        except FileNotFoundError:
            self.forget(row)
            raise web.HTTPNotFound(text="the instance's file is no longer kept") from None
        except RenderFailed as exc:
            raise web.HTTPServiceUnavailable(text=str(exc)) from None

    # ------------------------------------------------------------------------------------------ finding
    async def _rows(self, request: web.Request) -> list[dict[str, Any]]:
        """The kept instances a path names (404 when there are none)."""

        def uid(key: str) -> str | None:
            return _uid(request, key) if key in request.match_info else None

        study, series, sop = uid("study"), uid("series"), uid("sop")
        now = time.monotonic()
        if sop is not None:
            at, row = self._instances.get(sop, (0.0, {}))
            if now - at < ROW_TTL:
                if row["study_uid"] != study or row["series_uid"] != series:
                    raise web.HTTPNotFound(text="no such study, series or instance")
                return [row]
        rows = await self.gw.catalog.web_rows(study_uid=study, series_uid=series, sop_uid=sop)
        if not rows:
            raise web.HTTPNotFound(text="no such study, series or instance")
        if sop is not None:
            if len(self._instances) >= ROW_CACHE:
                for key in list(self._instances)[: ROW_CACHE // 4]:  # the oldest quarter
                    del self._instances[key]
            self._instances[sop] = (now, rows[0])
        return rows

    def forget(self, row: dict[str, Any]) -> None:
        """A row whose file is gone (purged): not served from the cache again."""
        self._instances.pop(str(row["sop_uid"]), None)

    def path_of(self, row: dict[str, Any]) -> Path:
        return self.gw.storage.root / str(row["path"])

    def _base(self, request: web.Request) -> str:
        return base_url(request)

    # ------------------------------------------------------------------------------------------ QIDO-RS
    def search(self, level: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            self.gw.renderers.prestart()  # a search comes before images: the decoders start meanwhile
            fixed = {}
            if "study" in request.match_info:
                fixed["StudyInstanceUID"] = _uid(request, "study")
            if "series" in request.match_info:
                fixed["SeriesInstanceUID"] = _uid(request, "series")
            try:
                query = qido.parse(level, list(request.query.items()), fixed)
            except qido.QueryError as exc:
                return web.Response(status=400, text=str(exc))
            rows = await self._candidates(level, query, fixed)
            results = [r for r in rows if query.matches(r)]
            page = results[query.offset : query.offset + query.limit]
            await self.record(request, "query", page, {"level": level, **dict(request.query)})
            base = self._base(request)
            body = [qido.to_json(r, query.include, _retrieve_url(base, level, r)) for r in page]
            headers = {}
            if len(results) > query.offset + query.limit:
                headers["Warning"] = '299 dicom-mail-gateway "There are more results than the limit"'
            elif query.not_included:
                headers["Warning"] = '299 dicom-mail-gateway "The following includefields were not supported"'
            if not body:
                return web.Response(status=204, headers=headers)
            return web.Response(body=json.dumps(body).encode(), content_type=DICOM_JSON, headers=headers)

        return handler

    async def _candidates(self, level: str, query: qido.Query, fixed: dict[str, str]) -> list[dict[str, Any]]:
        """The rows a query is matched against, aggregated in the database: one per study (with its counts and
        modalities), per series (with its study's attributes) or per instance (with both), narrowed by the
        path's UIDs, a StudyInstanceUID list and the direction/partner extensions."""
        catalog = self.gw.catalog
        studies: tuple[str, ...] = ()
        for m in query.matchers:
            if m.attr.keyword == "StudyInstanceUID" and m.kind == "uids":
                studies = m.values
        scope: dict[str, Any] = {
            "study_uid": fixed.get("StudyInstanceUID"),
            "studies": studies,
            "direction": query.extensions.get("direction"),
            "partner": query.extensions.get("partner"),
        }
        study_rows = await catalog.web_groups(qido.STUDY, **scope)
        if level == qido.STUDY:
            return study_rows
        by_study = {str(r["study_uid"]): r for r in study_rows}
        series_rows = await catalog.web_groups(
            qido.SERIES, series_uid=fixed.get("SeriesInstanceUID"), **scope
        )
        if level == qido.SERIES:
            return [{**se, **by_study[str(se["study_uid"])]} for se in series_rows]
        by_series = {str(r["series_uid"]): r for r in series_rows}
        rows = await catalog.web_rows(series_uid=fixed.get("SeriesInstanceUID"), **scope)
        return [
            {**r, **by_study[str(r["study_uid"])], **by_series[str(r["series_uid"])], **_own(r)} for r in rows
        ]

    # ------------------------------------------------------------------------------------------ WADO-RS
    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        """The named instances as multipart/related application/dicom, one file after another from disk."""
        rows = await self._rows(request)
        wanted = _accept_syntax(request, "application/dicom")
        if wanted not in (None, "*", ExplicitVRLittleEndian) and any(
            str(r["transfer_syntax"]) != wanted for r in rows
        ):
            raise web.HTTPNotAcceptable(text=f"instances are not available in {wanted[:64]}")
        convert = wanted in (None, ExplicitVRLittleEndian)
        await self.record(request, "retrieve", rows)
        boundary = secrets.token_hex(16)
        response = web.StreamResponse(
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
        )
        await response.prepare(request)
        for row in rows:
            await response.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            path = self.path_of(row)
            if convert and str(row["transfer_syntax"]) != ExplicitVRLittleEndian:
                await response.write(await asyncio.to_thread(_as_explicit, path))
            else:
                async for chunk in chunks(path):
                    await response.write(chunk)
            await response.write(b"\r\n")
        await response.write(f"--{boundary}--\r\n".encode())
        await response.write_eof()
        return response

    async def metadata(self, request: web.Request) -> web.Response:
        """DICOM JSON of every instance named, from the cache the index fills (made now where it is missing)."""
        rows = await self._rows(request)
        cache = self.gw.storage.root / "state" / "webmeta"

        def build() -> bytes:
            parts = [
                imaging.metadata_cached(
                    self.path_of(r), cache, (str(r["study_uid"]), str(r["series_uid"]), str(r["sop_uid"]))
                )
                for r in rows
            ]
            return b"[" + b",".join(parts) + b"]"

        body = (await asyncio.to_thread(build)).replace(imaging.BASE.encode(), self._base(request).encode())
        await self.record(request, "metadata", rows)
        return web.Response(body=body, content_type=DICOM_JSON)

    async def frames(self, request: web.Request) -> web.Response:
        [row] = await self._rows(request)
        numbers = _frames(request.match_info["frames"])
        wanted = _accept_syntax(request, "application/octet-stream")
        keep = wanted == "*" or wanted == str(row["transfer_syntax"])
        path = self.path_of(row)
        if imaging.needs_decoding(str(row["transfer_syntax"]), keep):
            cut = self.gw.renderers.raw_frames(path, numbers, keep)
        else:
            cut = asyncio.to_thread(imaging.raw_frames, path, numbers, keep)
        frames, syntax = await self.pixels(row, cut)
        await self.record(request, "view", [row])
        boundary = secrets.token_hex(16)
        kind = "application/octet-stream"
        parts = [
            f"--{boundary}\r\nContent-Type: {kind}; transfer-syntax={syntax}\r\n\r\n".encode() + f + b"\r\n"
            for f in frames
        ]
        return web.Response(
            body=b"".join(parts) + f"--{boundary}--\r\n".encode(),
            headers={"Content-Type": f'multipart/related; type="{kind}"; boundary={boundary}'},
        )

    async def rendered(self, request: web.Request) -> web.Response:
        [row] = await self._rows(request)
        frame = _frames(request.match_info.get("frames", "1"))[0]
        return await self._render(request, row, frame, _viewport(request.query.get("viewport")))

    async def thumbnail(self, request: web.Request) -> web.Response:
        rows = await self._rows(request)
        row = rows[len(rows) // 2]  # the middle image of a study or series
        frame = _frames(request.match_info.get("frames", "1"))[0]
        return await self._render(request, row, frame, _viewport(request.query.get("viewport")) or (128, 128))

    async def _render(
        self, request: web.Request, row: dict[str, Any], frame: int, viewport: tuple[int, int] | None
    ) -> web.Response:
        media = "image/png" if "image/png" in request.headers.get("Accept", "") else "image/jpeg"
        try:
            quality = int(request.query.get("quality", "90"))
        except ValueError:
            raise web.HTTPBadRequest(text="quality: a number from 1 to 100") from None
        window = window_param(request.query.get("window"))
        image = await self.pixels(
            row, self.gw.renderers.render(self.path_of(row), frame, window, viewport, media, quality)
        )
        await self.record(request, "view", [row])
        return web.Response(body=image, content_type=media)

    async def bulkdata(self, request: web.Request) -> web.Response:
        [row] = await self._rows(request)
        try:
            tag = int(request.match_info["tag"], 16)
        except ValueError:
            raise web.HTTPBadRequest(text="tag: 8 hex digits") from None
        try:
            value = await asyncio.to_thread(imaging.bulk_value, self.path_of(row), tag)
        except KeyError:
            raise web.HTTPNotFound(text="no such bulk data") from None
        await self.record(request, "view", [row])
        boundary = secrets.token_hex(16)
        body = (
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
            + value
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return web.Response(
            body=body,
            headers={
                "Content-Type": f'multipart/related; type="application/octet-stream"; boundary={boundary}'
            },
        )


async def chunks(path: Path) -> AsyncIterator[bytes]:
    """The file in chunks, each read in a thread: memory holds one chunk, whatever the file's size."""
    f = await asyncio.to_thread(path.open, "rb")
    try:
        while data := await asyncio.to_thread(f.read, CHUNK):
            yield data
    finally:
        f.close()


def _as_explicit(path: Path) -> bytes:
    """A stored instance converted to Explicit VR Little Endian (decompressed), as a Part 10 file."""
    import io

    from gateway.stages.forward import as_native

    ds = as_native(path)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _viewport(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.split(",")[:2])
    except ValueError:
        raise web.HTTPBadRequest(text="viewport: width,height") from None
    if not (1 <= w <= 4096 and 1 <= h <= 4096):
        raise web.HTTPBadRequest(text="viewport: 1 to 4096 pixels")
    return w, h


def window_param(text: str | None) -> imaging.Window | None:
    if not text:
        return None
    try:
        center, width = (float(v) for v in text.split(",")[:2])
    except ValueError:
        raise web.HTTPBadRequest(text="window: center,width[,function]") from None
    if width <= 0:
        raise web.HTTPBadRequest(text="window: width must be positive")
    return imaging.Window(center, width)


def base_url(request: web.Request) -> str:
    """The DICOMweb base URL clients reach us by, for Retrieve and BulkData URIs: a reverse proxy's
    X-Forwarded-Host/-Proto, else the Host header, with our port added when the client left it out
    (dicomweb-client sends `Host: 127.0.0.1` for any port)."""
    forwarded = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
    scheme = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip() or request.scheme
    host = forwarded or request.headers.get("Host", "") or "localhost"
    if not forwarded and not re.search(r":\d+$", host):
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        port = int(sock[1]) if sock else 0
        if port and port != {"http": 80, "https": 443}.get(scheme):
            host = f"{host}:{port}"
    return f"{scheme}://{host}{PREFIX}"


def _own(row: dict[str, Any]) -> dict[str, Any]:
    """An instance row's own values (they win over its series' and study's aggregates when merged)."""
    return {k: v for k, v in row.items() if k not in ("instance_count",)}


def _retrieve_url(base: str, level: str, r: dict[str, Any]) -> str:
    url = f"{base}/studies/{r['study_uid']}"
    if level in (qido.SERIES, qido.INSTANCE):
        url += f"/series/{r['series_uid']}"
    if level == qido.INSTANCE:
        url += f"/instances/{r['sop_uid']}"
    return url

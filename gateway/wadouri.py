"""WADO-URI (PS3.18 §9) for older viewers: `GET /dicomweb/wado?requestType=WADO&studyUID=…&seriesUID=…&objectUID=…`
with `contentType` application/dicom (the file as stored), image/jpeg (default) or image/png (rendered as WADO-RS
`rendered` does it: `frameNumber`, `windowCenter`/`windowWidth`). Same login, checks and access events as the rest
of DICOMweb (`gateway.dicomweb`)."""

from __future__ import annotations

from aiohttp import web

from gateway.dicomweb import PREFIX, UID_RE, DicomWeb, chunks, window_param


class WadoUri:
    """The WADO-URI route, on top of the DICOMweb service."""

    def __init__(self, dw: DicomWeb) -> None:
        self.dw = dw

    def routes(self) -> list[web.RouteDef]:
        return [web.get(f"{PREFIX}/wado", self.wado_uri)]

    async def wado_uri(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        if q.get("requestType") != "WADO":
            raise web.HTTPBadRequest(text="requestType must be WADO")
        ids = {}
        for key, name in (("studyUID", "study"), ("seriesUID", "series"), ("objectUID", "sop")):
            value = q.get(key, "")
            if len(value) > 64 or not UID_RE.match(value):
                raise web.HTTPBadRequest(text=f"{key}: not a UID")
            ids[name] = value
        rows = await self.dw.gw.catalog.web_rows(
            study_uid=ids["study"], series_uid=ids["series"], sop_uid=ids["sop"]
        )
        if not rows:
            raise web.HTTPNotFound(text="no such instance")
        content_type = q.get("contentType", "image/jpeg")
        await self.dw.record(request, "retrieve" if content_type == "application/dicom" else "view", rows)
        if content_type == "application/dicom":
            response = web.StreamResponse(headers={"Content-Type": "application/dicom"})
            await response.prepare(request)
            async for chunk in chunks(self.dw.path_of(rows[0])):
                await response.write(chunk)
            await response.write_eof()
            return response
        if content_type not in ("image/jpeg", "image/png"):
            raise web.HTTPNotAcceptable(text="contentType: application/dicom, image/jpeg or image/png")
        frame = int(q.get("frameNumber", "1")) if q.get("frameNumber", "1").isdigit() else 1
        window = None
        if q.get("windowCenter") and q.get("windowWidth"):
            window = window_param(f"{q['windowCenter']},{q['windowWidth']}")
        image = await self.dw.pixels(
            rows[0],
            self.dw.gw.renderers.render(self.dw.path_of(rows[0]), frame, window, None, content_type, 90),
        )
        return web.Response(body=image, content_type=content_type)

"""The web port: a status page for operators, `/metrics` for Prometheus, `/healthz` for orchestrators.

Served by the gateway itself (aiohttp), on `web.bind` (localhost by default). Every address needs a login, loopback
too unless `web.anonymous_on_loopback` opts out: the user `operator` with the password from the environment
variable `web.password_env`, either through the login form (a session cookie: HttpOnly, SameSite=Strict, Secure
over TLS; 12 hours) or HTTP basic auth for scripts (Prometheus). Bound elsewhere than loopback, TLS is required
too (`web.tls_cert`, `web.tls_key`). `/healthz` is open (it says ok or not, nothing else).

Every state-changing request (POST) must carry the session's CSRF token and, when the browser sends one, an Origin
(or Referer) naming this very host: a page elsewhere cannot make an operator's browser release or discard mail.
Pages and thumbnails (patient images) are sent with `Cache-Control: no-store`. The page is plain server-rendered
HTML that refreshes itself; the only script is the confirmation of a quarantine action. Patient-identifying fields
are not shown unless `web.show_patient_data`. Release, discard and re-send go through `gateway.operator`, as the CLI's do.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import logging
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import generate_latest

from gateway import clusterview, status
from gateway.dicomweb import DicomWeb
from gateway.metrics import REGISTRY
from gateway.renderers import RenderFailed
from gateway.report import outcome_text
from gateway.stow import Stow
from gateway.wadouri import WadoUri
from gateway.webauth import WebAuth

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

VIEWER = Path(__file__).parent / "viewer"
VIEWER_FILES = {"index.html": "text/html", "viewer.js": "text/javascript", "viewer.css": "text/css"}


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _ts(value: object) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(value))) if value else "-"  # type: ignore[arg-type]


class WebApp:
    """The aiohttp application of one gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.settings = gw.settings.web
        self.auth = WebAuth(self.settings, gw.settings.name)
        if gw.ctx.audit is not None:
            self.auth.on_login = gw.ctx.audit.login
        self.dicomweb = DicomWeb(gw)
        self.app = web.Application(middlewares=[self.auth.middleware], client_max_size=1024**2)
        self.app.add_routes(
            [
                web.get("/", self.page),
                web.get("/login", self.auth.login_page),
                web.post("/login", self.auth.login),
                web.post("/logout", self.auth.logout),
                web.get("/healthz", self.healthz),
                web.get("/metrics", self.metrics),
                web.get("/thumb/{sop}.png", self.thumb),
                web.post("/queue/{action}/{item}", self.queue_action),
                web.post("/study/{study}/resend", self.resend),
                web.get("/viewer", self.viewer_redirect),
                web.get("/viewer/", self.viewer_file),
                web.get("/viewer/{name}", self.viewer_file),
                *self.dicomweb.routes(),
                *WadoUri(self.dicomweb).routes(),
                *Stow(gw).routes(),
            ]
        )
        self.runner: web.AppRunner | None = None

    async def viewer_redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/viewer/")

    async def viewer_file(self, request: web.Request) -> web.StreamResponse:
        """The viewer's static files (shipped in the package; only these names are served)."""
        name = request.match_info.get("name", "index.html")
        if name not in VIEWER_FILES:
            raise web.HTTPNotFound()
        data = await asyncio.to_thread((VIEWER / name).read_bytes)
        return web.Response(body=data, content_type=VIEWER_FILES[name])

    async def start(self) -> None:
        """Listen on the configured address (TLS when configured)."""
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        ctx = None
        if self.settings.tls_cert:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(self.settings.tls_cert), str(self.settings.tls_key))
        site = web.TCPSite(self.runner, self.settings.bind, self.settings.port, ssl_context=ctx)
        await site.start()
        if self.settings.requires_login and not self.auth.password():
            log.warning(
                "web page: %s is empty, so nobody can log in (only /healthz answers); set it to the operator's password",
                self.settings.password_env,
            )
        log.info(
            "web status page on %s://%s:%d/",
            "https" if ctx else "http",
            self.settings.bind,
            self.settings.port,
        )

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # ------------------------------------------------------------------------------------------ handlers
    async def healthz(self, request: web.Request) -> web.Response:
        stalled = self.gw.progress.stalled(time.time(), self.gw.settings.monitoring.stage_stall)
        ok = self.gw.scp.listening and all(not t.done() for t in self.gw.tasks) and not stalled
        body = {"ok": ok, "gateway": self.gw.settings.name, "stalled": sorted(stalled)}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, REGISTRY)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def thumb(self, request: web.Request) -> web.Response:
        sop = request.match_info["sop"]
        rows = await self.gw.catalog.audit_rows(
            [sop]
        )  # (study, class, path): its file, and its study for the trail
        if not rows:
            raise web.HTTPNotFound()
        study, _, path = rows[0]
        try:
            png = await self.gw.renderers.thumbnail(self.gw.storage.root / path, 128)
        except (FileNotFoundError, RenderFailed):
            raise web.HTTPNotFound() from None
        await self.dicomweb.record(request, "view", [{"study_uid": study}])  # who saw which study's image
        # a patient image: never kept by the browser or a proxy
        return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "no-store"})

    async def queue_action(self, request: web.Request) -> web.Response:
        from gateway.operator import ActionRefused, OperatorActions

        action, item_id = request.match_info["action"], request.match_info["item"]
        if action not in ("release", "discard"):
            raise web.HTTPBadRequest(text="unknown action")
        actions = OperatorActions(self.gw.settings, self.gw.storage, self.gw.catalog, self.gw.ctx.audit)
        try:
            await (actions.release if action == "release" else actions.discard)(item_id, "web:operator")
        except ActionRefused as exc:
            raise web.HTTPConflict(text=str(exc)) from None
        self.gw.wake_all()
        raise web.HTTPSeeOther("/#quarantine")

    async def resend(self, request: web.Request) -> web.Response:
        """The study page's "send to": a new transfer of the stored study to the chosen partner
        (`OperatorActions.resend`, as the CLI's `resend`)."""
        from gateway.operator import ActionRefused, OperatorActions

        form = await request.post()
        partner = str(form.get("partner", ""))
        actions = OperatorActions(self.gw.settings, self.gw.storage, self.gw.catalog, self.gw.ctx.audit)
        try:
            await actions.resend(request.match_info["study"], partner, "web:operator")
        except ActionRefused as exc:
            raise web.HTTPConflict(text=str(exc)) from None
        self.gw.wake_all()
        raise web.HTTPSeeOther("/#studies")

    async def _studies(self) -> list[dict[str, Any]]:
        out = []
        for entry in await self.gw.catalog.recent_studies(10):
            series = entry["series"]
            if self.settings.show_patient_data and series:
                entry["patient"] = await asyncio.to_thread(self._patient, str(series[0][3]))
            out.append(entry)
        return out

    def _patient(self, sop: str) -> str:
        """Only with web.show_patient_data: name and ID from the stored file, for the operator's eyes only."""
        import pydicom

        path = next(iter(self.gw.storage.images.rglob(f"{sop}.dcm")), None)
        if path is None:
            return ""
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"])
        return f"{ds.get('PatientName', '')} ({ds.get('PatientID', '')})"

    async def page(self, request: web.Request) -> web.Response:
        """The status page (server-rendered from `gateway.status`; its forms carry the CSRF token)."""
        gw = self.gw
        live = gw.status()  # its address book is in it already: not read twice
        view = await status.read(gw.settings, gw.catalog, live=live, limit=30, partners=live["partners"])
        studies = await self._studies()
        if (
            self.settings.show_patient_data and studies
        ):  # the page names patients: the audit trail hears of it
            await self.dicomweb.record(request, "view", [{"study_uid": s["uid"]} for s in studies])
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='10'>",
            f"<title>{_e(view.name)} — DICOM mail gateway</title><style>",
            "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}",
            "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}th{background:#eee}",
            ".bad{color:#b00}.ok{color:#070}img{margin:2px;border:1px solid #999}</style></head><body>",
            f"<h1>{_e(view.name)} <small>AE {_e(view.ae_title)}, DICOM port "
            + (f"{gw.scp.port}" if gw.scp.listening else f"{gw.settings.dicom_port} (not listening)")
            + "</small></h1>",
        ]
        if view.catalog_problem:
            parts.append(f"<p class='bad'>{_e(view.catalog_problem)}</p>")
        parts += _queues(view)
        parts += clusterview.html(view)
        parts += _nodes(view)
        parts += _transfers(view)
        parts += _studies_html(
            studies, [p.name for p in gw.settings.partners], _e(self.auth.csrf_token(request))
        )
        parts += _backups(view)
        parts += _set_aside(view, _e(self.auth.csrf_token(request)))
        parts.append(f"<p><small>refreshed {_ts(view.at)}</small></p></body></html>")
        return web.Response(text="".join(parts), content_type="text/html")


def _queues(view: status.Status) -> list[str]:
    from gateway.core.queue import QueueState

    out = ["<h2>Queues</h2><table><tr><th>queue</th>", *[f"<th>{s.value}</th>" for s in QueueState], "</tr>"]
    for q in view.queues.values():
        cells = "".join(f"<td>{q.counts.get(s.value, 0)}</td>" for s in QueueState)
        out.append(f"<tr><td>{q.name}</td>{cells}</tr>")
    out.append("</table>")
    return out


def _nodes(view: status.Status) -> list[str]:
    out = [
        "<h2>Mail nodes</h2><table><tr><th>node</th><th>protocol</th><th>ok</th><th>failed</th><th>last error</th></tr>"
    ]
    for n in view.nodes():
        out.append(
            f"<tr class='{'bad' if n['failing'] else 'ok'}'><td>{_e(n['node'])}</td><td>{_e(n['protocol'].upper())}</td>"
            f"<td>{n.get('ok', 0)}</td><td>{n.get('failed', 0)}</td><td>{_e(n.get('last_error') or '')}</td></tr>"
        )
    out.append("</table>")
    return out


def _transfers(view: status.Status) -> list[str]:
    out = [
        "<h2>Transfers</h2><table><tr><th>transfer</th><th>dir</th><th>partner</th><th>state</th>"
        "<th>mails</th><th>instances</th><th>updated</th><th>receipt (out) / PACS (in)</th><th>reason</th></tr>"
    ]
    for t in view.catalog.get("transfers", []):
        troubled = t["receipt"] in ("failed", "warning", "overdue") or t.get("receipt_conflict")
        troubled = troubled or t.get("proof") == "differs" or bool(t.get("not_committed"))
        troubled = troubled or any(f["state"] in ("rejected", "not-committed") for f in t["pacs"])
        cls = "bad" if t["state"] == "failed" or troubled else ""
        out.append(
            f"<tr class='{cls}'><td>{_e(t['id'])}</td><td>{_e(t['direction'])}</td><td>{_e(t['partner'])}</td>"
            f"<td>{_e(t['state'])}</td><td>{t['parts_done']}/{_e(t['parts_total'] or '?')}</td><td>{t['instances']}</td>"
            f"<td>{_ts(t['updated_at'])}</td><td>{_e(outcome_text(t))}</td><td>{_e(t['error'] or '')}</td></tr>"
        )
    out.append("</table>")
    return out


def _resend_form(study_uid: str, partners: list[str], token: str) -> str:
    """Send a stored study (again) to a partner: one select and one confirmed button (CSRF token included)."""
    if not partners:
        return ""
    options = "".join(f"<option value='{_e(p)}'>{_e(p)}</option>" for p in partners)
    return (
        f"<form class='resend' method='post' action='/study/{_e(study_uid)}/resend' style='display:inline' "
        "onsubmit=\"return confirm('Send this study to ' + this.partner.value + '?')\">"
        f"<input type='hidden' name='csrf' value='{token}'> send to <select name='partner'>{options}</select> "
        "<button class='resend'>send</button></form>"
    )


def _studies_html(studies: list[dict[str, Any]], partners: list[str], token: str) -> list[str]:
    out = ["<h2 id='studies'>Recent studies</h2>"]
    for s in studies:
        patient = f" — {_e(s['patient'])}" if s.get("patient") else ""
        out.append(
            f"<div class='study'><a href='/viewer/#study={_e(s['uid'])}'><b>{_e(s['uid'])}</b></a>{patient}: "
            f"{s['count']} instances, {len(s['series'])} series, "
            f"from {_e(s['source'])}, {_ts(s['last'])} {_resend_form(str(s['uid']), partners, token)}<br>"
        )
        for series_uid, modality, n, sop in s["series"]:
            out.append(
                f"<img class='thumb' src='/thumb/{_e(sop)}.png' width='96' height='96' alt='{_e(modality)} series, {n} images' "
                f"title='{_e(modality)} {_e(series_uid)}: {n}'>"
            )
        out.append("</div>")
    return out


def _backups(view: status.Status) -> list[str]:
    out = ["<h2>Backups</h2><ul>"]
    last = view.backup_last
    if last:
        state = "ok" if last.get("ok") else "failed"
        out.append(
            f"<li class='{'ok' if last.get('ok') else 'bad'}'>last: {state} {_ts(last.get('at'))} {_e(last.get('detail'))}</li>"
        )
    out += [f"<li>{_e(name)}</li>" for name in view.backup_sets]
    out.append("</ul>")
    return out


def _set_aside(view: status.Status, token: str) -> list[str]:
    """Held and corrupt mails and fragment groups, each with its retry/discard form (CSRF token included)."""

    def form(action: str, iid: str, question: str, label: str) -> str:
        return (
            f"<form method='post' action='/queue/{action}/{iid}' style='display:inline' "
            f"onsubmit=\"return confirm('{question}')\"><input type='hidden' name='csrf' value='{token}'>"
            f"<button class='{label}'>{label}</button></form> "
        )

    out = [
        "<h2 id='quarantine'>Quarantine</h2><table><tr><th>mail</th><th>state</th><th>since</th><th>reason</th><th></th></tr>"
    ]
    for h in view.held:
        iid = _e(h.id)
        reason = h.reason + (f" — bytes dropped: {h.content_dropped}" if h.content_dropped else "")
        retry = (
            "" if h.content_dropped else form("release", iid, "Check and process this mail again?", "retry")
        )
        out.append(
            f"<tr><td>{iid}</td><td>{h.state}</td><td>{_ts(h.since)}</td><td>{_e(reason)}</td><td>{retry}"
            + form("discard", iid, "Discard this mail for good?", "discard")
            + "</td></tr>"
        )
    for g in view.fragments:
        gid = _e(g["key"])
        what = f"fragments {g['have']}/{g['total'] or '?'} from {g['sender']}, {g['bytes']} bytes"
        dropped = f" — dropped: {g['dropped']}" if g.get("dropped") else ""
        out.append(
            f"<tr><td>{gid}</td><td>fragments</td><td>{_ts(g['first_seen'])}</td><td>{_e(what + dropped)}</td><td>"
            + form("discard", gid, "Discard this incomplete message for good?", "discard")
            + "</td></tr>"
        )
    out.append("</table>")
    return out


def is_loopback(bind: str) -> bool:
    """True for addresses only this machine can reach."""
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return bind == "localhost"

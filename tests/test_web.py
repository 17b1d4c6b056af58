"""The web port: status page in headless Chromium (thumbnails, quarantine retry, screenshot), /metrics, /healthz."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

from gateway.adapters.smtp import SmtpCluster
from gateway.config import load
from gateway.core.queue import QueueState
from gateway.devtools.studies import make_study
from gateway.spool import Spool
from gateway.tls import mail_client_context
from tests.browser import Browser
from tests.conftest import CANARIES, WEB_PASSWORD, storescu, wait_for
from tests.ports import free_port

ARTIFACTS = Path(__file__).resolve().parents[1] / ".dev" / "artifacts"


def get(url: str, auth: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


OPERATOR = f"operator:{WEB_PASSWORD}"


async def test_status_page_in_a_real_browser(mail, make_gateway, pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    web_port = free_port()
    gw = make_gateway("gateway-c", [("gateway-b", "gateway-b", "TO_B")], poll_interval=1, web_port=web_port)
    gw.start()
    base = f"http://127.0.0.1:{web_port}"
    make_study(tmp_path / "s", ct=3, mr=2, sc=1, size=64)
    assert storescu(gw.port, "GATEWAY_C", tmp_path / "s").returncode == 0
    # a mail from a sender that is not in gateway-c's address book: quarantined
    a = load(make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")]).config)
    await SmtpCluster(a.mail, mail_client_context(a.mail)).send(
        a.mail.address, "gateway-c@dicommail.test", b"Subject: x\r\n\r\nhello\r\n"
    )
    inbox = Spool(gw.d_root / "spool" / "inbox", gw.d_root / "tmp")
    held = await asyncio.to_thread(
        wait_for, lambda: inbox.items(QueueState.HOLD), 30, 0.5, "the mail to be held"
    )
    assert "address book" in held[0].meta["reason"]

    status, body = await asyncio.to_thread(get, f"{base}/healthz")
    assert status == 200 and json.loads(body)["ok"] is True
    status, _ = await asyncio.to_thread(get, f"{base}/metrics")
    assert status == 401, "a login on loopback too"
    status, metrics = await asyncio.to_thread(get, f"{base}/metrics", OPERATOR)
    assert status == 200
    assert (
        b"dmg_instances_received_total 6.0" in metrics
        and b'dmg_queue_depth{queue="inbox",state="hold"} 1.0' in metrics
    )
    assert b"dmg_transfer_latency_seconds_bucket" in metrics
    assert b"dmg_event_loop_max_block_seconds " in metrics and b"dmg_event_loop_blocks_total " in metrics

    browser = Browser()
    try:
        await browser.connect()
        await browser.goto(base + "/")  # not logged in: the login form
        assert "password" in str(await browser.evaluate("document.body.innerHTML"))
        await browser.evaluate(
            f"document.querySelector('input[name=password]').value = '{WEB_PASSWORD}';"
            "document.querySelector('form').submit(); 1"
        )
        for _ in range(100):
            if await browser.evaluate("location.pathname + document.readyState") == "/complete":
                break
            await asyncio.sleep(0.1)
        text = str(await browser.evaluate("document.body.innerText"))
        assert "Quarantine" in text and "address book" in text and "Mail nodes" in text
        assert await browser.evaluate("document.querySelectorAll('img.thumb').length") == 3  # one per series
        for _ in range(100):  # until the browser has loaded every thumbnail (or given up on one)
            loaded = await browser.evaluate(
                "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
            )
            if loaded or await browser.evaluate("Array.from(document.images).every(i => i.complete)"):
                break
            await asyncio.sleep(0.1)
        assert loaded is True, "every thumbnail loads"
        shot = await browser.call("Page.captureScreenshot", format="png")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "web-status.png").write_bytes(base64.b64decode(shot["data"]))
        html = str(await browser.evaluate("document.documentElement.outerHTML"))
        for canary in CANARIES:
            assert canary.decode() not in html and canary not in metrics
        # the operator clicks "retry" and confirms: the mail is checked again (and held again, for the same reason)
        await browser.evaluate(
            "window.confirm = () => true; document.querySelector('button.retry').click(); 1"
        )

        def rechecked() -> bool:
            item = inbox.find(held[0].id)
            return item is not None and item.state is QueueState.HOLD and "released" in item.meta

        await asyncio.to_thread(wait_for, rechecked, 30, 0.5, "the released mail to be checked again")
        await browser.session.close()
    finally:
        browser.close()

    status, _ = await asyncio.to_thread(
        get, f"{base}/thumb/{json.loads(gw.cli('status', '--json'))['studies'][0]['study_uid']}.png", OPERATOR
    )
    assert status == 404  # a study UID is not an instance: nothing leaks by guessing
    image = Image.open(io.BytesIO((ARTIFACTS / "web-status.png").read_bytes()))
    assert image.size[0] >= 1000


def test_off_loopback_the_page_needs_tls_and_a_login(mail, make_gateway, pki_dir, monkeypatch):  # type: ignore[no-untyped-def]
    import ssl
    import sys

    web_port = free_port()
    plain = make_gateway(
        "gateway-c",
        [("gateway-b", "gateway-b", "TO_B")],
        web_port=web_port,
        web_extra='bind = "0.0.0.0"',
    )
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "status", "-c", str(plain.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "web.bind" in r.stderr and "tls_cert" in r.stderr

    monkeypatch.setenv("DMG_WEB_PASSWORD", "s3cret-for-the-test")
    tls = f'bind = "0.0.0.0"\ntls_cert = "{pki_dir / "mail-server.pem"}"\ntls_key = "{pki_dir / "mail-server.key"}"'
    gw = make_gateway("gateway-c", [("gateway-b", "gateway-b", "TO_B")], web_port=web_port, web_extra=tls)
    gw.start()
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
    base = f"https://127.0.0.1:{web_port}"

    def fetch(path: str, auth: str | None = None) -> int:
        req = urllib.request.Request(base + path)
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    wait_for(lambda: fetch("/healthz") == 200, 30, 0.3, "the TLS web port")
    assert fetch("/metrics") == 401
    assert fetch("/metrics", "operator:wrong") == 401
    assert fetch("/", "operator:s3cret-for-the-test") == 200
    assert fetch("/metrics", "operator:s3cret-for-the-test") == 200


def test_state_changes_need_a_login_and_a_same_origin_token(mail, make_gateway, pki_dir):  # type: ignore[no-untyped-def]
    """Release and discard: refused without a login, refused cross-origin or without the CSRF token even with
    the operator's session, done with both; pages and thumbnails are never cached."""
    import http.cookiejar
    import re
    import urllib.parse

    web_port = free_port()
    gw = make_gateway("gateway-c", [("gateway-b", "gateway-b", "TO_B")], poll_interval=1, web_port=web_port)
    gw.start()
    a = load(make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")]).config)
    asyncio.run(
        SmtpCluster(a.mail, mail_client_context(a.mail)).send(
            a.mail.address, "gateway-c@dicommail.test", b"Subject: x\r\n\r\nhello\r\n"
        )
    )
    inbox = Spool(gw.d_root / "spool" / "inbox", gw.d_root / "tmp")
    item = wait_for(lambda: inbox.items(QueueState.HOLD), 30, 0.5, "a held mail")[0]
    base = f"http://127.0.0.1:{web_port}"
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))

    def call(
        path: str, form: dict[str, str] | None = None, origin: str | None = None
    ) -> tuple[int, str, dict]:  # type: ignore[type-arg]
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(base + path, data=data)
        if origin:
            req.add_header("Origin", origin)
        try:
            with opener.open(req, timeout=10) as r:
                return r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), dict(e.headers)

    # no login: the page is the login form, an action is refused
    status, body, _ = call("/")
    assert status == 200 and "type='password'" in body
    assert call(f"/queue/discard/{item.id}", {"csrf": "x"})[0] == 401
    assert call("/login", {"user": "operator", "password": "wrong"})[0] == 401
    status, body, headers = call("/login", {"user": "operator", "password": WEB_PASSWORD}, origin=base)
    assert status == 200 and "Quarantine" in body
    assert headers.get("Cache-Control") == "no-store"
    token = re.search(r"name='csrf' value='([^']+)'", body).group(1)  # type: ignore[union-attr]
    # logged in, but without the token, with a wrong one, or from another origin: refused, nothing changes
    assert call(f"/queue/discard/{item.id}", {})[0] == 403
    assert call(f"/queue/discard/{item.id}", {"csrf": "forged"}, origin=base)[0] == 403
    assert call(f"/queue/discard/{item.id}", {"csrf": token}, origin="http://evil.example")[0] == 403
    assert inbox.find(item.id).state is QueueState.HOLD  # type: ignore[union-attr]
    # the operator's own page: done
    status, _, _ = call(f"/queue/discard/{item.id}", {"csrf": token}, origin=base)
    assert status == 200
    assert inbox.find(item.id).state is QueueState.DONE  # type: ignore[union-attr]
    assert "discarded" in json.dumps(json.loads(gw.cli("status", "--json"))["mails_by_state"])

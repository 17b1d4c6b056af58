"""OHIF (npm @ohif/app 3.12, its ready-built viewer) on the gateway's DICOMweb, in headless Chromium, served as
`contrib/ohif/serve.py` serves it for users: OHIF and /dicomweb on one origin, the proxy adding the gateway's bearer
token. The study list shows the study, and the viewer shows its image (the viewport is not blank). Real-peer tier:
it downloads OHIF from the npm registry (once per checkout, into .dev/ohif)."""

from __future__ import annotations

import asyncio
import base64
import io
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from aiohttp import web
from PIL import Image

from gateway.devtools.studies import make_ct_study
from gateway.web import WebApp
from tests.browser import ARTIFACTS, Browser
from tests.ports import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contrib" / "ohif"))
import serve as ohif

TOKEN = "ohif-proxy-token-0123456789"


@pytest.fixture(autouse=True)
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMG_WEB_PASSWORD", "ohif-operator")
    monkeypatch.setenv("DMG_WEB_TOKENS", TOKEN)


@pytest.mark.peers
@pytest.mark.asyncio
async def test_ohif_lists_and_shows_a_study_from_the_gateway(pair_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dist = await asyncio.to_thread(ohif.fetch, "3.12")
    pair = await pair_factory()
    paths = make_ct_study(tmp_path / "ct", count=10, size=256)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PixelSpacing = [0.7, 0.7]
        ds.StudyDescription = "OHIF interop"
        ds.save_as(p, enforce_file_format=True)
    await pair.send_study(tmp_path / "ct")
    assert await pair.a_sends() >= 1
    assert await pair.b_receives_and_answers() >= 1
    assert await pair.b.webindex.run_once() == len(paths)
    gw_port, ohif_port = free_port(), free_port()
    gateway = web.AppRunner(WebApp(pair.b).app)
    await gateway.setup()
    await web.TCPSite(gateway, "127.0.0.1", gw_port).start()
    viewer = web.AppRunner(ohif.app(dist, f"http://127.0.0.1:{gw_port}", TOKEN))
    await viewer.setup()
    await web.TCPSite(viewer, "127.0.0.1", ohif_port).start()
    study = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
    browser = Browser()
    try:
        await browser.connect()
        await browser.goto(f"http://127.0.0.1:{ohif_port}/")
        await browser.until(
            "document.body.innerText.includes('OHIF interop')", "the study in OHIF's list", 600
        )
        await browser.goto(f"http://127.0.0.1:{ohif_port}/viewer?StudyInstanceUIDs={study}")
        for _ in range(120):  # bounded: until the viewport shows the image (or 60 s)
            await browser.evaluate(
                "Array.from(document.querySelectorAll('button, span, div')).filter(e => e.children.length === 0"
                " && /^(Skip all|Confirm and hide)$/.test(e.textContent.trim())).forEach(e => e.click()); 1"
            )
            shot = await browser.call("Page.captureScreenshot", format="png")
            image = np.asarray(Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("L"))
            h, w = image.shape
            if (
                image[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] > 80
            ).mean() > 0.3:  # the phantom, not a dialog
                break
            await asyncio.sleep(0.5)
        else:
            raise AssertionError("OHIF never showed the image")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "ohif-viewer.png").write_bytes(base64.b64decode(shot["data"]))
    finally:
        if getattr(browser, "session", None) is not None:
            await browser.session.close()
        await asyncio.to_thread(browser.close)
        await viewer.cleanup()
        await gateway.cleanup()

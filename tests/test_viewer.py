"""The viewer in headless Chromium, on a whole gateway (B, after a CT study arrived from A by mail): log in, open the
study from the list, scroll the series, change window/level (preset and drag), zoom, measure a length in mm; the
rendering of a known slice equals a reference computed here from the stored pixels; screenshots are saved to
.dev/artifacts/ as test artifacts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pydicom
import pytest
from aiohttp import web

from gateway.devtools.studies import make_ct_study
from gateway.web import WebApp
from tests.browser import Browser
from tests.ports import free_port

PASSWORD = "viewer-operator"


@pytest.fixture(autouse=True)
def web_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMG_WEB_PASSWORD", PASSWORD)


@pytest.mark.asyncio
async def test_the_viewer_opens_scrolls_windows_zooms_and_measures(pair_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pair = await pair_factory()
    paths = make_ct_study(tmp_path / "ct", count=6, size=256)
    for p in paths:  # 0.7 mm pixels, so that a length can be measured
        ds = pydicom.dcmread(p)
        ds.PixelSpacing = [0.7, 0.7]
        ds.save_as(p, enforce_file_format=True)
    await pair.send_study(tmp_path / "ct")
    assert await pair.a_sends() >= 1
    assert await pair.b_receives_and_answers() >= 1
    assert await pair.b.webindex.run_once() == len(paths)
    port = free_port()
    runner = web.AppRunner(WebApp(pair.b).app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    browser = Browser()
    try:
        await browser.connect()
        await browser.goto(f"{base}/login")
        await browser.evaluate(
            f"document.querySelector('[name=password]').value = {PASSWORD!r}; document.forms[0].submit(); 1"
        )
        await browser.until("location.pathname === '/' && document.readyState === 'complete'", "logged in")
        assert "/viewer/#study=" in str(
            await browser.evaluate("document.body.innerHTML")
        )  # linked from status
        await browser.goto(f"{base}/viewer/")
        await browser.until("window.viewer && viewer.listed === 1", "the study in the list")
        await browser.screenshot("viewer-list")
        await browser.evaluate("document.querySelector('#studies tbody tr').click(); 1")
        await browser.until(
            "viewer.images.length === 6 && viewer.loaded === 6 && viewer.lastImage !== null", "all six slices"
        )
        assert await browser.evaluate("viewer.errors") == []

        # scrolling: the wheel and the keys
        await browser.evaluate(
            "document.querySelector('#view').dispatchEvent(new WheelEvent('wheel', {deltaY: 100, bubbles: true})); 1"
        )
        await browser.evaluate("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowDown'})); 1")
        assert await browser.evaluate("viewer.index") == 2

        # a known slice, a known window: the canvas image equals the reference computed from the stored pixels
        await browser.evaluate(
            "const s = document.querySelector('#preset'); s.value = '40,400'; s.dispatchEvent(new Event('change')); 1"
        )
        shown = await browser.evaluate("Array.from(viewer.lastImage.data.filter((_, i) => i % 4 === 0))")
        slice_ = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: int(d.InstanceNumber))[2]
        hu = slice_.pixel_array.astype("float64") * float(slice_.RescaleSlope) + float(
            slice_.RescaleIntercept
        )
        lo = 40 - 0.5 - (400 - 1) / 2
        reference = np.clip((hu - lo) / (400 - 1) * 255, 0, 255).astype("uint8")
        assert np.array_equal(np.array(shown, dtype="uint8").reshape(256, 256), reference)
        await browser.screenshot("viewer-soft-tissue")

        # window/level by dragging, zoom by dragging with the zoom tool, a length with the length tool
        box = await browser.evaluate(
            "(() => { const r = document.querySelector('#view').getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        x, y = box  # type: ignore[misc]
        await _drag(browser, x, y, x + 60, y + 30)
        assert await browser.evaluate("viewer.wl.w !== 400 && viewer.wl.c !== 40")
        await browser.evaluate("document.querySelector('[data-tool=zoom]').click(); 1")
        await _drag(browser, x, y, x, y - 80)
        assert await browser.evaluate("viewer.zoom") > 1.2
        await browser.evaluate(
            "document.querySelector('#reset').click(); document.querySelector('[data-tool=measure]').click(); 1"
        )
        await _drag(browser, x - 50, y, x + 50, y)
        pixels = await browser.evaluate("Math.abs(viewer.measure.b[0] - viewer.measure.a[0])")
        mm = await browser.evaluate("viewer.measureMm(viewer.images[viewer.index])")
        assert mm == pytest.approx(float(pixels) * 0.7, rel=1e-6) and float(mm) > 10  # type: ignore[arg-type]
        await browser.screenshot("viewer-measured")
    finally:
        if getattr(browser, "session", None) is not None:
            await browser.session.close()
        await asyncio.to_thread(browser.close)
        await runner.cleanup()


async def _drag(browser: Browser, x0: float, y0: float, x1: float, y1: float) -> None:
    """A real mouse drag through the DevTools protocol (pointer events as a user makes them)."""
    await browser.call(
        "Input.dispatchMouseEvent", type="mousePressed", x=x0, y=y0, button="left", clickCount=1
    )
    for k in range(1, 6):
        await browser.call(
            "Input.dispatchMouseEvent",
            type="mouseMoved",
            x=x0 + (x1 - x0) * k / 5,
            y=y0 + (y1 - y0) * k / 5,
            button="left",
            buttons=1,
        )
    await browser.call(
        "Input.dispatchMouseEvent", type="mouseReleased", x=x1, y=y1, button="left", clickCount=1
    )

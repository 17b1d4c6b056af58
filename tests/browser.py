"""Headless Chromium driven over the DevTools protocol (the web page's and the viewer's browser tests)."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import aiohttp

from tests.ports import free_port

ARTIFACTS = Path(__file__).resolve().parents[1] / ".dev" / "artifacts"


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()  # type: ignore[no-any-return]


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):  # type: ignore[no-untyped-def]
    from tests.conftest import wait_for as bounded

    return bounded(predicate, timeout, interval, what)


class Browser:
    """Headless Chromium driven over the DevTools protocol."""

    def __init__(self) -> None:
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="dmg-chromium-")
        self.proc = subprocess.Popen(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={self.profile}",
                f"--remote-debugging-port={self.port}",
                "--window-size=1280,1600",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.next_id = 0

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def connect(self) -> None:
        def targets() -> list[dict]:  # type: ignore[type-arg]
            try:
                return [
                    t
                    for t in json.loads(_get(f"http://127.0.0.1:{self.port}/json/list"))
                    if t["type"] == "page"
                ]
            except OSError:
                return []

        page = (await asyncio.to_thread(wait_for, targets, 30, 0.2, "Chromium's DevTools endpoint"))[0]
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def call(self, method: str, **params: object) -> dict:  # type: ignore[type-arg]
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), 30)
            if msg.get("id") == self.next_id:
                return msg.get("result", {})  # type: ignore[no-any-return]

    async def evaluate(self, expression: str) -> object:
        result = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.call("Page.enable")
        await self.call("Page.navigate", url=url)
        for _ in range(100):
            if await self.evaluate("document.readyState") == "complete":
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the page never finished loading")

    async def screenshot(self, name: str) -> Path:
        """Save the page as it looks now to .dev/artifacts/<name>.png (a test artifact)."""
        shot = await self.call("Page.captureScreenshot", format="png")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def until(self, expression: str, what: str, tries: int = 300) -> object:
        """Evaluate until the page says something truthy (bounded: `tries` × 0.1 s)."""
        for _ in range(tries):
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"the page never got there: {what}")

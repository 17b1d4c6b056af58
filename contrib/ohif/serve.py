"""Serve OHIF's ready-built viewer (npm @ohif/app, dist/) on a gateway's DICOMweb, for trying it out.

    OHIF_GATEWAY_TOKEN=<one of the gateway's web.token_env tokens> \
        python contrib/ohif/serve.py --gateway http://127.0.0.1:8080 [--port 3000]

Downloads @ohif/app with npm (once, into .dev/ohif), answers OHIF's app-config.js from app-config.js.in, serves the
folder with unknown paths answered by index.html (OHIF routes in the browser), and forwards /dicomweb/... to the
gateway with the bearer token (streamed both ways), so OHIF and its data share one origin and the token stays here.
In production nginx does the same (proxy_pass to the gateway, proxy_set_header Authorization "Bearer …").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

HERE = Path(__file__).resolve().parent
CACHE = HERE.parents[1] / ".dev" / "ohif"


def fetch(version: str) -> Path:
    dist = CACHE / "package" / "dist"
    if not dist.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        name = (
            subprocess.run(
                ["npm", "pack", f"@ohif/app@{version}"], cwd=CACHE, check=True, capture_output=True, text=True
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        with tarfile.open(CACHE / name) as tar:
            tar.extractall(CACHE, filter="data")
    return dist


def app(dist: Path, gateway: str, token: str) -> web.Application:
    config = (HERE / "app-config.js.in").read_text()

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("accept", "content-type")}
        headers["Authorization"] = f"Bearer {token}"
        session: aiohttp.ClientSession = request.app["session"]
        async with session.request(
            request.method, gateway + request.path_qs, headers=headers, data=request.content
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for k in ("Content-Type", "Warning"):
                if k in upstream.headers:
                    response.headers[k] = upstream.headers[k]
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(1 << 20):
                await response.write(chunk)
            await response.write_eof()
            return response

    async def handler(request: web.Request) -> web.StreamResponse:
        name = request.match_info["path"] or "index.html"
        if name == "app-config.js":
            return web.Response(text=config, content_type="text/javascript")
        path = (dist / name).resolve()
        if dist in path.parents and path.is_file():
            return web.FileResponse(path)
        return web.FileResponse(dist / "index.html")

    async def session(application: web.Application) -> AsyncIterator[None]:
        application["session"] = aiohttp.ClientSession()
        yield
        await application["session"].close()

    application = web.Application()
    application.cleanup_ctx.append(session)
    application.add_routes([web.route("*", "/dicomweb/{rest:.*}", proxy), web.get("/{path:.*}", handler)])
    return application


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gateway", required=True, help="the gateway's web port, e.g. https://gateway:8080")
    ap.add_argument("--token-env", default="OHIF_GATEWAY_TOKEN", help="variable holding the bearer token")
    ap.add_argument("--port", type=int, default=3000)
    ap.add_argument("--version", default="3.12")
    a = ap.parse_args()
    web.run_app(app(fetch(a.version), a.gateway, os.environ[a.token_env]), host="127.0.0.1", port=a.port)


if __name__ == "__main__":
    main()

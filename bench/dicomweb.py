"""The DICOMweb case of `bench/run` (`--only dicomweb`): the gateway's DICOMweb beside Orthanc's DICOMweb plugin,
same study (a 512×512 CT series), same client (requests with keep-alive, threads for parallel requests).

Figures: QIDO /studies latency; the series' metadata; all frames of the series (native, one request per frame)
with 1 and 6 requests in parallel; rendered JPEG frames per second with 1 and 6 in parallel (the "scroll through a
CT" figure); time to the first image (the series' instance list, then the first rendered frame); and the
gateway's peak memory while it streams the whole study (WADO-RS), against its memory before.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

PASSWORD = "bench-dicomweb"
FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


class Server:
    """One DICOMweb origin: its base URL and a keep-alive session per thread."""

    def __init__(self, base: str, auth: tuple[str, str] | None) -> None:
        self.base, self.auth = base, auth
        self.sessions: dict[int, requests.Session] = {}

    def get(self, path: str, accept: str = "application/dicom+json") -> bytes:
        import threading

        s = self.sessions.get(threading.get_ident())
        if s is None:
            s = self.sessions[threading.get_ident()] = requests.Session()
            s.auth = self.auth
        r = s.get(self.base + path, headers={"Accept": accept}, timeout=120)
        r.raise_for_status()
        return r.content

    def stream(self, path: str, accept: str) -> int:
        """GET a large response in chunks (the client holds one at a time); how many bytes came."""
        s = requests.Session()
        s.auth = self.auth
        total = 0
        with s.get(self.base + path, headers={"Accept": accept}, timeout=1800, stream=True) as r:
            r.raise_for_status()
            for chunk in r.iter_content(1 << 20):
                total += len(chunk)
        return total


def _median(fn: Callable[[], float], repeat: int) -> float:
    return statistics.median(fn() for _ in range(repeat))


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rate(server: Server, paths: list[str], accept: str, parallel: int) -> float:
    """Requests per second over all `paths`, `parallel` at a time."""
    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda p: server.get(p, accept), paths))
    return len(paths) / (time.perf_counter() - start)


def figures(server: Server, study: str, series: str, sops: list[str], repeat: int) -> dict[str, float]:
    inst = f"/studies/{study}/series/{series}/instances"
    frames = [f"{inst}/{sop}/frames/1" for sop in sops]
    rendered = [f"{inst}/{sop}/rendered" for sop in sops]
    server.get("/studies")  # warm: connections, caches
    out = {
        "qido_ms": 1000 * _median(lambda: _timed(lambda: server.get("/studies")), max(repeat, 5)),
        "metadata_s": _median(
            lambda: _timed(lambda: server.get(f"/studies/{study}/series/{series}/metadata")), repeat
        ),
        "frames_per_s_1": _rate(server, frames, FRAMES, 1),
        "frames_per_s_6": _rate(server, frames, FRAMES, 6),
        "rendered_per_s_1": _rate(server, rendered, "image/jpeg", 1),
        "rendered_per_s_6": _rate(server, rendered, "image/jpeg", 6),
        "first_image_s": _median(
            lambda: _timed(
                lambda: (server.get(inst), server.get(rendered[len(rendered) // 2], "image/jpeg"))
            ),
            repeat,
        ),
    }
    return out


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]


def compare(ours: dict[str, float], theirs: dict[str, float]) -> dict[str, float]:
    """Ratios ours ÷ Orthanc as "how much better" (> 1 is better): rates divided, times inverted."""
    ratios = {}
    for k, v in ours.items():
        t = theirs.get(k)
        if not t or not v:
            continue
        ratios[k] = (t / v) if k.endswith(("_ms", "_s")) else (v / t)
    return ratios


def print_table(ours: dict[str, float], theirs: dict[str, float], ratios: dict[str, float]) -> None:
    print("\nDICOMweb (300-slice 512×512 CT; ratio > 1: the gateway is better)")
    print(f"  {'figure':<22} {'gateway':>10} {'Orthanc':>10} {'ratio':>7}")
    for k in ours:
        print(
            f"  {k:<22} {ours[k]:>10.3f} {theirs.get(k, float('nan')):>10.3f} {ratios.get(k, float('nan')):>7.2f}"
        )


def env_with_password() -> dict[str, str]:
    os.environ["DMG_WEB_PASSWORD"] = PASSWORD
    return dict(os.environ)

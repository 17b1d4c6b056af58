"""Benchmark harness (first case: ingest). Measures us and the peers users compare us with, in one run.

    bench/run [--images 500] [--repeat 3]

Ingest: DCMTK `storescu` (one association, TCP_NODELAY on every side) sends a CT study to
  - our gateway (acknowledged durably: fsync + journal before each success),
  - DCMTK `storescp +B` (bit-preserving, no fsync),
  - Orthanc (its default storage, which syncs).
Medians of `--repeat` runs; ratios are throughput ours ÷ peer. Every figure goes to bench/results/latest.json.
Later cases (packaging vs OpenSSL/GnuPG, end to end, memory, wire bytes) are issue 6's remaining work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.devtools import orthanc, pki  # noqa: E402
from gateway.devtools.devenv import render_config  # noqa: E402
from gateway.devtools.process import GatewayProcess  # noqa: E402
from gateway.devtools.studies import make_study  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def send(port: int, called: str, folder: Path) -> float:
    """storescu the whole folder on one association; seconds from start to end."""
    start = time.perf_counter()
    r = subprocess.run(
        ["storescu", "-aec", called, "127.0.0.1", str(port), "+sd", str(folder)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=1800,
    )
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"storescu to {called} failed: {r.stderr[-500:]}")
    return elapsed


def run_ours(work: Path, folder: Path) -> float:
    pki_dir = ROOT / "certs" / "dev"
    pki.make_dev_pki(pki_dir, ["gateway-a", "gateway-b"])
    port = free_port()
    cfg = work / "gateway.toml"
    cfg.write_text(
        render_config(
            name="gateway-a",
            ae_title="BENCH",
            port=port,
            d_root=work / "d",
            e_root=work / "e",
            pki_dir=pki_dir,
            partners=[],
            stability_delay=3600,
            poll_interval=3600,
        )
    )
    gw = GatewayProcess("bench", cfg, port, work / "gateway.log", work / "d")
    gw.start()
    try:
        return send(port, "BENCH", folder)
    finally:
        gw.stop()


def run_storescp(work: Path, folder: Path) -> float:
    port = free_port()
    (work / "out").mkdir()
    proc = subprocess.Popen(
        ["storescp", "+B", "-od", str(work / "out"), str(port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        return send(port, "STORESCP", folder)
    finally:
        proc.terminate()
        proc.wait(20)


def run_orthanc(work: Path, folder: Path) -> float:
    peer = orthanc.start(work)
    try:
        return send(peer.dicom_port, "ORTHANC", folder)
    finally:
        peer.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="dmg-bench-"))
    try:
        folder = base / "ct"
        make_study(folder, ct=a.images, mr=0, sc=0, size=512, rle_every=0)
        total = sum(p.stat().st_size for p in folder.iterdir())
        receivers: dict[str, Callable[[Path, Path], float]] = {
            "ours": run_ours,
            "storescp": run_storescp,
            "orthanc": run_orthanc,
        }
        times: dict[str, float] = {}
        for name, fn in receivers.items():
            runs = []
            for i in range(a.repeat):
                work = base / f"{name}-{i}"
                work.mkdir()
                runs.append(fn(work, folder))
                shutil.rmtree(work, ignore_errors=True)
            times[name] = statistics.median(runs)
        print(f"ingest, one association, {a.images} CT images, {total / 1e6:.0f} MB, median of {a.repeat}")
        print(f"{'receiver':<10} {'seconds':>8} {'images/s':>9} {'MB/s':>7} {'ours ÷ peer':>12}")
        for name, t in times.items():
            ratio = times[name] / times["ours"] if name != "ours" else 1.0
            print(f"{name:<10} {t:>8.2f} {a.images / t:>9.0f} {total / 1e6 / t:>7.0f} {ratio:>12.2f}")
        results = {
            "ingest_1assoc_seconds_ours": round(times["ours"], 3),
            "ingest_1assoc_vs_orthanc": round(times["orthanc"] / times["ours"], 3),
            "ingest_1assoc_vs_storescp": round(times["storescp"] / times["ours"], 3),
            "images": a.images,
            "bytes": total,
        }
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

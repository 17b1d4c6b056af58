"""The render workers (`gateway.renderers`): images made outside the gateway's process, the same as made in it;
a worker that dies, hangs or runs out of its memory limit costs at most that request, never the gateway or the
next request; windowing by lookup table gives exactly the formula's values."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import JPEG2000Lossless

from gateway import imaging
from gateway.devtools.studies import make_ct_study
from gateway.renderers import RenderFailed, RenderWorkers


@pytest.fixture
def ct(tmp_path: Path) -> Path:
    [path] = make_ct_study(tmp_path / "ct", count=1, size=256, seed=5)
    return path


@pytest.mark.parametrize("dtype", ["int16", "uint16", "uint8", "int8", "int32", "float32"])
def test_windowing_by_table_is_the_formula(dtype: str) -> None:
    """PS3.3 C.11.2.1.2's linear window after the modality rescale, for every pixel type a decoder gives."""
    rng = np.random.default_rng(1)
    low, high = (-2000 if dtype[0] == "i" else 0), (120 if "8" in dtype else 3000)
    pixels = rng.integers(low, high, size=(64, 64)).astype(dtype)
    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = 2, -10
    values = pixels.astype("float64") * 2 - 10
    full_range = imaging.Window((values.min() + values.max()) / 2, values.max() - values.min())
    for window in (None, imaging.Window(40, 400), imaging.Window(-500.5, 1)):
        w = window or full_range
        lo = w.center - 0.5 - (w.width - 1) / 2
        expected = np.clip((values - lo) * (255.0 / max(w.width - 1, 1.0)), 0, 255).astype("uint8")
        assert (imaging.windowed(pixels, ds, window) == expected).all(), (dtype, window)
        ds.PhotometricInterpretation = "MONOCHROME1"
        assert (imaging.windowed(pixels, ds, window) == 255 - expected).all(), (dtype, window)
        del ds.PhotometricInterpretation


async def test_images_from_workers_are_the_images_made_here(ct: Path, tmp_path: Path) -> None:
    workers = RenderWorkers(2, 30, 3 << 30)
    try:
        here = imaging.render(ct, 1, imaging.Window(40, 400), (128, 128), "image/png", 90)
        there = await workers.render(ct, 1, imaging.Window(40, 400), (128, 128), "image/png", 90)
        assert there == here
        frames, syntax = await workers.raw_frames(ct, [1], False)
        assert frames == [pydicom.dcmread(ct).PixelData] and syntax == "1.2.840.10008.1.2.1"
        with pytest.raises(imaging.NoSuchFrame):
            await workers.render(ct, 2, None, None, "image/jpeg", 90)
        with pytest.raises(FileNotFoundError):
            await workers.render(tmp_path / "gone.dcm", 1, None, None, "image/jpeg", 90)
        assert len(workers.pids()) == 2 and os.getpid() not in workers.pids()  # both started with the first
    finally:
        await workers.close()


async def test_broken_pixel_data_is_refused_and_the_worker_goes_on(ct: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(ct)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + os.urandom(500)])
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad, enforce_file_format=True)
    workers = RenderWorkers(1, 30, 3 << 30)
    try:
        with pytest.raises(imaging.Undecodable, match="cannot be decoded"):
            await workers.render(bad, 1, None, None, "image/jpeg", 90)
        [pid] = workers.pids()
        assert (await workers.render(ct, 1, None, None, "image/jpeg", 90))[:2] == b"\xff\xd8"
        assert workers.pids() == [pid]
    finally:
        await workers.close()


async def test_a_dead_or_hanging_worker_costs_one_request_at_most(ct: Path) -> None:
    workers = RenderWorkers(2, 30, 3 << 30)
    try:
        await asyncio.gather(*(workers.render(ct, 1, None, None, "image/jpeg", 90) for _ in range(4)))
        first = set(workers.pids())
        assert len(first) == 2
        # all killed while idle (the OOM killer, an operator); the event loop has not heard of it yet
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        assert (await workers.render(ct, 1, None, None, "image/jpeg", 90))[:2] == b"\xff\xd8"
        assert first.isdisjoint(workers.pids())
        workers.timeout = 1e-4  # injected: an image that takes longer than the limit
        with pytest.raises(RenderFailed):
            await workers.render(ct, 1, None, None, "image/jpeg", 90)
        assert workers.failures >= 2 and not any(p in workers.pids() for p in first)
        workers.timeout = 30
        assert (await workers.render(ct, 1, None, None, "image/jpeg", 90))[:2] == b"\xff\xd8"
    finally:
        await workers.close()


async def test_an_image_beyond_the_memory_limit_is_refused(ct: Path, tmp_path: Path) -> None:
    """A (hostile or merely huge) image that needs more than `render_memory` to decode is refused; the limit
    holds for the worker, not the gateway."""
    probe = RenderWorkers(1, 30, 0)
    try:
        await probe.render(ct, 1, None, None, "image/jpeg", 90)
        [pid] = probe.pids()
        size = next(
            int(line.split()[1]) * 1024
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmSize:")
        )
    finally:
        await probe.close()
    ds = pydicom.dcmread(ct)
    ds.Rows = ds.Columns = 6000  # 72 MB of pixels: more than the 48 MB left to the worker
    ds.PixelData = np.zeros((6000, 6000), dtype=np.uint16).tobytes()
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    workers = RenderWorkers(1, 60, size + (48 << 20))
    try:
        with pytest.raises((imaging.Undecodable, RenderFailed)):
            await workers.render(big, 1, None, None, "image/jpeg", 90)
        assert (await workers.render(ct, 1, None, None, "image/jpeg", 90))[:2] == b"\xff\xd8"
    finally:
        await workers.close()


async def test_idle_workers_end_and_come_back_when_needed(ct: Path) -> None:
    """A gateway nobody looks at keeps no decoder processes (their memory goes back); the next image starts one."""
    workers = RenderWorkers(1, 30, 3 << 30, idle=0.2)
    try:
        await workers.render(ct, 1, None, None, "image/jpeg", 90)
        [first] = workers.pids()
        deadline = asyncio.get_running_loop().time() + 20
        while workers.pids() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)  # the condition is polled, bounded; nothing waits on a guess
        assert workers.pids() == []
        assert (await workers.render(ct, 1, None, None, "image/jpeg", 90))[:2] == b"\xff\xd8"
        assert workers.pids() != [first]
    finally:
        await workers.close()

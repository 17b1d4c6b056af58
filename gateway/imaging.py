"""Pixels for people: frames decoded from a stored instance, and rendered images (JPEG or PNG) with a window, a
viewport and a quality, as WADO-RS `rendered`, thumbnails and WADO-URI give them. Decoding is CPU work: callers
run these in a thread (or a worker process), never on the event loop.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array

log = logging.getLogger(__name__)


class FrameError(ValueError):
    """Pixel data that cannot be given: see the two kinds."""


class NoSuchFrame(FrameError):
    """A frame number the instance does not have (or an instance without pixel data): 404."""


class Undecodable(FrameError):
    """Pixel data in a syntax no decoder here reads, or broken data: 406."""


@dataclass(frozen=True)
class Window:
    """A VOI window: centre and width (PS3.3 C.11.2.1.2), linear."""

    center: float
    width: float


def frame_count(ds: Dataset) -> int:
    return max(1, int(getattr(ds, "NumberOfFrames", 1) or 1))


def check_frames(ds: Dataset, numbers: list[int]) -> None:
    n = frame_count(ds)
    bad = [f for f in numbers if not 1 <= f <= n]
    if bad or "PixelData" not in ds:
        raise NoSuchFrame(f"frame {bad[0] if bad else 1} is not in this instance ({n} frames)")


def needs_decoding(syntax: str, keep_compressed: bool) -> bool:
    """Whether `raw_frames` must run a decoder (in a render worker) for a file in this transfer syntax, or only
    cuts the stored bytes (in a thread: no decoder touches the data)."""
    uid = pydicom.uid.UID(syntax)
    return not ((uid.is_compressed and keep_compressed) or (not uid.is_compressed and uid.is_little_endian))


def raw_frames(path: Path, numbers: list[int], keep_compressed: bool) -> tuple[list[bytes], str]:
    """The frames' bytes and their transfer syntax: as stored where that is kept (uncompressed data, or compressed
    with `keep_compressed`), else decoded to little-endian native pixels (one frame in memory at a time)."""
    ds = pydicom.dcmread(path)
    check_frames(ds, numbers)
    syntax = pydicom.uid.UID(str(ds.file_meta.TransferSyntaxUID))
    if syntax.is_compressed and keep_compressed:
        frames = list(generate_frames(ds.PixelData, number_of_frames=frame_count(ds)))
        return [frames[f - 1] for f in numbers], str(syntax)
    if not syntax.is_compressed and syntax.is_little_endian:
        size = len(ds.PixelData) // frame_count(ds)
        return [bytes(ds.PixelData[(f - 1) * size : f * size]) for f in numbers], "1.2.840.10008.1.2.1"
    out = []
    for f in numbers:
        pixels = _decode(path, f, Dataset())
        out.append(pixels.astype(pixels.dtype.newbyteorder("<")).tobytes())
    return out, "1.2.840.10008.1.2.1"


def _decode(path: Path, frame: int, ds: Dataset) -> np.ndarray:
    """One frame's pixels (colour as RGB), read from the file without the other frames where the file allows
    (a deflated one does not); `ds` receives the image pixel module (group 0028) and the file meta. MemoryError
    and FileNotFoundError pass through."""
    try:
        return pixel_array(str(path), ds_out=ds, index=frame - 1)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception:  # deflated, no such frame, no pixel data, no decoder, or broken: find out which below
        pass
    try:
        whole = pydicom.dcmread(path)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as exc:
        raise Undecodable(f"the file cannot be read here ({type(exc).__name__})") from None
    check_frames(whole, [frame])
    for element in whole.group_dataset(0x0028):
        ds.add(element)
    ds.file_meta = whole.file_meta
    try:
        return pixel_array(whole, index=frame - 1)
    except MemoryError:
        raise
    except Exception as exc:
        raise Undecodable(f"the pixel data cannot be decoded here ({type(exc).__name__})") from None


def _default_window(ds: Dataset, lo: float, hi: float) -> Window:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = center[0] if isinstance(center, pydicom.multival.MultiValue) else center
        w = width[0] if isinstance(width, pydicom.multival.MultiValue) else width
        if float(w) > 0:
            return Window(float(c), float(w))
    return Window((lo + hi) / 2, max(hi - lo, 1.0))  # the frame's full range, as the viewer's default


def windowed(pixels: np.ndarray, ds: Dataset, window: Window | None) -> np.ndarray:
    """Grey pixels as 8 bits: modality rescale (slope, intercept), then the linear VOI window of PS3.3 C.11.2.1.2
    (the given one, the dataset's own, else the frame's full range). 8- and 16-bit pixels go through a lookup
    table over the values present (one entry per stored value, not one float per pixel; no array wider than the
    pixels themselves), others through floats."""
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    index: np.ndarray | None = None
    if pixels.dtype.kind in "iu" and pixels.dtype.itemsize <= 2:
        bias = 1 << (8 * pixels.dtype.itemsize - 1) if pixels.dtype.kind == "i" else 0
        # signed values made unsigned in the same order (flip the sign bit), so that one subtraction indexes
        ordered = pixels.view(f"u{pixels.dtype.itemsize}") ^ bias if bias else pixels
        low, high = int(ordered.min()), int(ordered.max())
        values = (np.arange(low, high + 1, dtype=np.float64) - bias) * slope + intercept
        index = ordered - ordered.dtype.type(low) if low else ordered
    else:
        values = pixels.astype(np.float64) * slope + intercept
    w = window or _default_window(ds, float(values.min()), float(values.max()))
    lo = w.center - 0.5 - (w.width - 1) / 2
    table = ((values - lo) * (255.0 / max(w.width - 1, 1.0))).clip(0, 255).astype(np.uint8)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
        table = 255 - table
    return table if index is None else np.take(table, index)


def render(
    path: Path,
    frame: int = 1,
    window: Window | None = None,
    viewport: tuple[int, int] | None = None,
    media_type: str = "image/jpeg",
    quality: int = 90,
) -> bytes:
    """One frame as an 8-bit image: modality rescale, the window (the dataset's own, else the frame's full
    range, as the viewer's default), MONOCHROME1 inverted, scaled to fit `viewport` keeping its aspect ratio."""
    ds = Dataset()
    pixels = _decode(path, frame, ds)
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # colour: RGB already (the decoder converts YBR)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype("uint8"), "RGB")
    else:
        image = Image.fromarray(windowed(pixels, ds, window), "L")
    if viewport is not None:
        image.thumbnail(viewport)
    out = io.BytesIO()
    if media_type == "image/png":
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=max(1, min(100, quality)))
    return out.getvalue()


BASE = "@@DICOMWEB@@"  # stands for the DICOMweb base URL in cached metadata (`metadata_cached`)


def metadata_cached(path: Path, cache: Path, ids: tuple[str, str, str]) -> bytes:
    """An instance's DICOM JSON as bytes with `BASE` in its BulkDataURIs, from the cache the index fills
    (`cache/<SOP Instance UID>.json`), or made now and put there (instances never change under their UID)."""
    study, series, sop = ids
    target = cache / f"{sop}.json"
    try:
        return target.read_bytes()
    except FileNotFoundError:
        pass
    import json

    data = json.dumps(
        metadata(path, f"{BASE}/studies/{study}/series/{series}/instances/{sop}/bulkdata"),
        separators=(",", ":"),
    ).encode()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{sop}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, target)  # a cache: no fsync, a lost file is made again
    return data


def metadata(path: Path, bulk_uri: str) -> dict[str, Any]:
    """The instance as DICOM JSON without its bulk data: large binary values (pixel data among them) are named by
    a BulkDataURI under `bulk_uri` (`…/bulkdata/<tag>`)."""
    ds = pydicom.dcmread(path, defer_size=1024)

    def bulk(element: Any) -> str:
        return f"{bulk_uri}/{element.tag:08X}"

    out: dict[str, Any] = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=bulk)
    meta = ds.file_meta
    out["00020010"] = {"vr": "UI", "Value": [str(meta.TransferSyntaxUID)]}
    return dict(sorted(out.items()))


def thumbnail_png(path: str, size: int = 128) -> bytes:
    """A square PNG of the first frame (Pillow), the image centred on black so that a tall or wide one stays inside
    its box; a grey square, with one INFO line, when the pixel data cannot be decoded here."""
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            arr = arr[0]
        arr = arr.astype("float64")
        lo, hi = float(np.percentile(arr, 1)), float(np.percentile(arr, 99))
        arr = np.clip((arr - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype("uint8")
        if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
            arr = 255 - arr
        image = Image.fromarray(arr)
        image = image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode)
        image.thumbnail((size, size))
        canvas = Image.new(image.mode, (size, size))
        canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    except Exception as exc:  # any decoder's failure: the page shows a placeholder, never an error
        log.info("no thumbnail for %s: %s", Path(path).stem, type(exc).__name__)
        canvas = Image.new("L", (size, size), 96)
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def bulk_value(path: Path, tag: int) -> bytes:
    """The raw value of one top-level binary element (for a BulkDataURI); KeyError when it is not there."""
    ds = pydicom.dcmread(path)
    if tag not in ds:
        raise KeyError(tag)
    value = ds[tag].value
    if isinstance(value, bytes):
        return value
    raise KeyError(tag)

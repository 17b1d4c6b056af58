"""A study in every transfer syntax a modality sends, made by DCMTK (another toolkit than ours) and OpenJPEG."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pydicom
from pydicom.uid import JPEG2000Lossless

from gateway.devtools.studies import make_study

# file name stem → the DCMTK command that makes it from an Explicit VR Little Endian source
DCMTK = {
    "implicit": ["dcmconv", "+ti"],
    "bigendian": ["dcmconv", "+tb"],
    "deflated": ["dcmconv", "+td"],
    "rle": ["dcmcrle"],
    "jpeglossless": ["dcmcjpeg", "+e1"],
    "jpegext12": ["dcmcjpeg", "+ee"],  # lossy 12-bit JPEG Extended
    "jpegls": ["dcmcjpls"],
}
# what DCMTK's storescu must propose for each (it sends a file only in a context of its own syntax)
PROPOSE = {
    "implicit": "-xi",
    "bigendian": "-xb",
    "deflated": "-xd",
    "rle": "-xr",
    "jpeglossless": "-xs",
    "jpegext12": "-xx",
    "jpegls": "-xt",
    "jpeg2000": "-xv",
}


def send_each(port: int, called_ae: str, study: dict[str, Path]) -> None:
    """Send every file of the study with DCMTK's storescu (a real modality), proposing the file's own syntax."""
    for stem, path in study.items():
        r = subprocess.run(
            [
                "storescu",
                "-aet",
                "MODALITY",
                "-aec",
                called_ae,
                PROPOSE.get(stem, "-xe"),
                "127.0.0.1",
                str(port),
                str(path),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "TCP_NODELAY": "1"},
            timeout=120,
        )
        assert r.returncode == 0 and "Failed" not in r.stderr, f"{stem}: {r.stderr}"


def make_syntax_study(folder: Path, seed: int) -> dict[str, Path]:
    """One study of CT, MR and SC instances: one in each syntax of `DCMTK`, one JPEG 2000 Lossless and the rest
    Explicit VR Little Endian. Returns file stem → path; each call makes new UIDs."""
    work = folder.parent / f"{folder.name}-src"
    sources = make_study(work, ct=len(DCMTK) + 1, mr=2, sc=2, size=64, rle_every=0, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    for (stem, cmd), src in zip(DCMTK.items(), sources, strict=False):
        made[stem] = folder / f"{stem}.dcm"
        subprocess.run([*cmd, str(src), str(made[stem])], check=True, capture_output=True, timeout=60)
    j2k = pydicom.dcmread(sources[len(DCMTK)])
    j2k.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    made["jpeg2000"] = folder / "jpeg2000.dcm"
    j2k.save_as(made["jpeg2000"], enforce_file_format=True)
    for src in sources[len(DCMTK) + 1 :]:
        made[src.stem] = folder / src.name
        made[src.stem].write_bytes(src.read_bytes())
    return made

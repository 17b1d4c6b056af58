"""Generated DICOM studies for tests and benchmarks: several series and SOP classes, compressed and uncompressed.

The patient attributes are canary strings, so a test can prove they never leave storage. Needs numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SC = "1.2.840.10008.5.1.4.1.1.7"

CANARY_NAME = "CANARYZQX^PATIENTJWV"
CANARY_ID = "PIDCANARY7731"
CANARY_BIRTH = "19230417"


def _instance(
    sop_class: str,
    modality: str,
    study: str,
    series: str,
    series_no: int,
    number: int,
    size: int,
    rng: np.random.Generator,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    ds.SeriesNumber = series_no
    ds.InstanceNumber = number
    ds.PatientName = CANARY_NAME
    ds.PatientID = CANARY_ID
    ds.PatientBirthDate = CANARY_BIRTH
    ds.StudyDate = "20261123"
    ds.AccessionNumber = "ACC1"
    ds.Rows = size
    ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    yy, xx = np.mgrid[0:size, 0:size]
    phantom = (
        (np.hypot(yy - size / 2, xx - size / 2) < size / 3) * 1000 + rng.integers(0, 60, (size, size))
    ).astype(np.uint16)
    ds.PixelData = phantom.tobytes()
    return ds


def make_study(
    folder: Path,
    *,
    ct: int = 30,
    mr: int = 20,
    sc: int = 12,
    size: int = 128,
    rle_every: int = 4,
    seed: int = 1,
) -> list[Path]:
    """Write a study: CT, MR and Secondary Capture series; every `rle_every`-th MR instance RLE compressed."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    paths = []
    for series_no, (sop_class, modality, count) in enumerate(
        ((CT, "CT", ct), (MR, "MR", mr), (SC, "OT", sc)), start=1
    ):
        series = generate_uid()
        for n in range(1, count + 1):
            ds = _instance(sop_class, modality, study, series, series_no, n, size, rng)
            if modality == "MR" and rle_every and n % rle_every == 0:
                ds.compress(RLELossless, encoding_plugin="pydicom")
            path = folder / f"{modality}{series_no}_{n:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths

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


def ct_slice(size: int, z: float, rng: np.random.Generator) -> np.ndarray:
    """One CT-like slice in stored values (HU + 1024, 12 bits): a round field of view padded with 0 outside,
    air, a body ellipse of soft tissue with smooth variation, two lungs, a bone ring and a spine, and scanner noise
    (σ ≈ 12 HU). What matters for compression benchmarks is that it has the structure and noise of a real CT,
    not random bits."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    body = (xx / 0.42) ** 2 + (yy / 0.32) ** 2 < 1
    hu[body] = 40 + 25 * np.sin(6 * xx[body] + 3 * z) * np.cos(5 * yy[body])
    for cx in (-0.17, 0.17):  # lungs
        lung = ((xx - cx) / 0.13) ** 2 + ((yy + 0.02) / 0.2) ** 2 < 1
        hu[lung] = -850 + 40 * np.cos(20 * yy[lung] + z)
    ring = ((xx / 0.4) ** 2 + (yy / 0.3) ** 2 < 1) & ((xx / 0.37) ** 2 + (yy / 0.27) ** 2 > 1)
    hu[ring] = 900
    spine = (xx / 0.05) ** 2 + ((yy - 0.2) / 0.05) ** 2 < 1
    hu[spine] = 700 + 300 * np.cos(40 * xx[spine])
    hu += rng.normal(0, 12, hu.shape).astype(np.float32)
    stored = np.clip(hu + 1024, 0, 4095)
    stored[xx**2 + yy**2 > 0.25] = 0  # outside the reconstructed field of view: padding
    return stored.astype(np.uint16)


def make_ct_study(folder: Path, *, count: int = 20, size: int = 512, seed: int = 1) -> list[Path]:
    """A CT series of `count` realistic slices (see `ct_slice`), uncompressed, 16 bits allocated, 12 stored."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for n in range(1, count + 1):
        ds = _instance(CT, "CT", study, series, 1, n, 8, rng)
        ds.Rows = ds.Columns = size
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelPaddingValue = 0
        ds.SliceThickness = 1.0
        ds.ImagePositionPatient = [0, 0, float(n)]
        ds.PixelData = ct_slice(size, n / 10, rng).tobytes()
        path = folder / f"CT_{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

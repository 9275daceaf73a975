"""A small imaging task the project generates itself, written as real DICOM files.

Lesion vs no lesion on textured backgrounds: each image is a smooth random texture (low-pass
filtered noise plus faint stripes, like tissue seen by a scanner) and, for a positive case, a
small bright blob (a "lesion") of random size and position. The task is non-IID across
hospitals the way real sites differ: each hospital has its own lesion prevalence and its own
"scanner" (brightness, contrast, texture scale).

Files are single-frame MONOCHROME2 secondary-capture DICOM (12 bits stored in 16), written
with ``pydicom``, so the DICOM path of :class:`~peer.data.ImageFolderSource` is exercised end
to end; each hospital folder has a ``labels.csv`` (``file,label``, label 1 = lesion).

Used by ``ceremony demo --task imaging``, the imaging tests and the imaging benchmark. Public,
synthetic data: ``numpy``'s seeded generator is fine here (nothing is secret).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "HOSPITAL_STYLES",
    "ScannerStyle",
    "synthetic_image",
    "write_dicom",
    "write_imaging_task",
]

_MAX_12_BIT = 4095


@dataclass(frozen=True, slots=True)
class ScannerStyle:
    """How one hospital's images differ from the others' (its share of the non-IID split).

    Attributes:
        prevalence: fraction of its images with a lesion.
        brightness: mean background intensity, in [0, 1].
        contrast: standard deviation of the background texture.
        texture_scale: spatial scale of the texture (larger = smoother), in pixels.
    """

    prevalence: float
    brightness: float
    contrast: float
    texture_scale: float


HOSPITAL_STYLES = (
    ScannerStyle(prevalence=0.25, brightness=0.35, contrast=0.06, texture_scale=3.0),
    ScannerStyle(prevalence=0.5, brightness=0.45, contrast=0.08, texture_scale=4.0),
    ScannerStyle(prevalence=0.75, brightness=0.40, contrast=0.07, texture_scale=2.5),
)


def _texture(rng: np.random.Generator, size: int, scale: float) -> npt.NDArray[np.float64]:
    """Zero-mean, unit-variance smooth noise: white noise low-pass filtered in frequency."""
    noise = rng.standard_normal((size, size))
    freq = np.fft.fftfreq(size)
    radius2 = freq[:, None] ** 2 + freq[None, :] ** 2
    smooth = np.real(np.fft.ifft2(np.fft.fft2(noise) * np.exp(-radius2 * (2 * np.pi * scale) ** 2)))
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = 0.5 * np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / (size / 3))
    field: npt.NDArray[np.float64] = smooth / (smooth.std() + 1e-12) + stripes
    normalized: npt.NDArray[np.float64] = (field - field.mean()) / (field.std() + 1e-12)
    return normalized


def synthetic_image(
    rng: np.random.Generator, size: int, lesion: bool, style: ScannerStyle
) -> npt.NDArray[np.uint16]:
    """One 12-bit grayscale image of ``size`` x ``size`` pixels, with or without a lesion."""
    image = style.brightness + style.contrast * _texture(rng, size, style.texture_scale)
    if lesion:
        sigma = rng.uniform(0.06, 0.1) * size
        margin = int(2 * sigma) + 1
        cy, cx = rng.integers(margin, size - margin, size=2)
        yy, xx = np.mgrid[0:size, 0:size]
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        image = image + rng.uniform(0.25, 0.4) * blob
    return np.round(np.clip(image, 0.0, 1.0) * _MAX_12_BIT).astype(np.uint16)


def write_dicom(path: Path, pixels: npt.NDArray[np.uint16], patient_id: str) -> None:
    """A single-frame MONOCHROME2 secondary-capture DICOM file (12 bits stored)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_imaging_task(
    root: Path,
    hospitals: Sequence[str],
    images_per_hospital: int | Sequence[int] = 120,
    size: int = 32,
    seed: int = 0,
    styles: Sequence[ScannerStyle] = HOSPITAL_STYLES,
) -> dict[str, Path]:
    """Write each hospital's DICOM folder and ``labels.csv`` under ``root/<hospital>/``.

    Args:
        images_per_hospital: one count for all, or one per hospital.
        styles: one per hospital (cycled if there are more hospitals).

    Returns:
        each hospital's folder (its ``labels.csv`` is inside).
    """
    counts = (
        [images_per_hospital] * len(hospitals)
        if isinstance(images_per_hospital, int)
        else list(images_per_hospital)
    )
    rng = np.random.default_rng(seed)
    folders: dict[str, Path] = {}
    for index, (hospital, count) in enumerate(zip(hospitals, counts, strict=True)):
        style = styles[index % len(styles)]
        folder = root / hospital
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(count):
            lesion = bool(rng.random() < style.prevalence)
            name = f"{hospital}-{i:05d}.dcm"
            write_dicom(folder / name, synthetic_image(rng, size, lesion, style), name[:-4])
            rows.append((name, int(lesion)))
        with (folder / "labels.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(("file", "label"))
            writer.writerows(rows)
        folders[hospital] = folder
    return folders

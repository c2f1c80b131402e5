"""How depth frames are filed: the formats the phantom fleet writes and ingestion reads.

A clinic exports its depth camera's frames in one of two ways, and both carry what a frame needs
to become a case: the distances (mm, 16 bit), the pixel spacing (without it a body's length in
pixels says nothing about its height) and the labels (weight and height).

- PNG: a 16-bit greyscale PNG per frame (mode "I;16", value = distance in mm, 0 = no reading),
  the pixel spacing in a text chunk `PixelSpacing` ("along\\across" in mm, DICOM's order: row
  spacing, column spacing) or else the PNG's physical pixel size (pHYs, pixels per metre), the
  camera's maker, model and the table height (mm) in text chunks named as `DEVICE_KEYS`, and a
  labels CSV beside them with the columns `file,weight_kg,height_cm` (`file`: the frame's path
  relative to the frames folder), optionally `patient_id` (keeps a patient's frames in one split)
  and `pixel_spacing_mm` (for PNGs that carry no spacing).
- DICOM: one single-frame Secondary Capture image per frame, Modality OT, ImageType
  ORIGINAL\\PRIMARY\\DEPTH, 16-bit unsigned MONOCHROME2, PixelSpacing in mm, the labels as
  PatientWeight (kg) and PatientSize (m), each frame its own patient, study and series. A labels
  CSV may complete or correct them.

Case records made from either hold the frame as image [1, rows, cols] float32 (mm) with spacing
[1, along, across] and the metadata keys of `frame_metadata`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

LABEL_COLUMNS = ("file", "weight_kg", "height_cm")
OPTIONAL_LABEL_COLUMNS = ("patient_id", "pixel_spacing_mm")
PNG_SPACING_KEY = "PixelSpacing"
DEVICE_KEYS = ("Manufacturer", "ManufacturerModelName", "TableHeight")  # DICOM keywords; a PNG's text chunks by these names
DEPTH_IMAGE_TYPE = ("ORIGINAL", "PRIMARY", "DEPTH")
DEPTH_MODALITY = "OT"
DEPTH_SERIES_DESCRIPTION = "DEPTH FRAME mm camera to surface"


def frame_metadata(pixel_spacing: tuple[float, float], file_format: str, manufacturer: str = "", model: str = "",
                   table_height_mm: float | None = None) -> dict[str, Any]:
    """The acquisition facts of a depth frame's case record (absent facts left out): what the
    phantom's records and ingested records share, so a mock copies the same keys."""
    metadata: dict[str, Any] = {"Modality": DEPTH_MODALITY, "ImageType": "\\".join(DEPTH_IMAGE_TYPE),
                                "PixelSpacing": [float(v) for v in pixel_spacing], "DepthUnit": "mm",
                                "FrameFormat": file_format}
    if manufacturer:
        metadata["Manufacturer"] = manufacturer
    if model:
        metadata["ManufacturerModelName"] = model
    if table_height_mm is not None:
        metadata["TableHeight"] = float(table_height_mm)
    return metadata


def write_png_frame(path: str | Path, depth: np.ndarray, pixel_spacing: tuple[float, float],
                    text: Mapping[str, str] | None = None) -> Path:
    """`depth` (uint16 [rows, cols], mm) as a 16-bit greyscale PNG with its spacing in a text
    chunk and in pHYs, and `text` (e.g. Manufacturer) as further text chunks."""
    from PIL import Image, PngImagePlugin

    depth = np.asarray(depth)
    if depth.dtype != np.uint16 or depth.ndim != 2:
        raise ValueError(f"{path}: a depth frame is a 2-D uint16 array of mm, got {depth.dtype} {depth.shape}")
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_SPACING_KEY, f"{pixel_spacing[0]:.6g}\\{pixel_spacing[1]:.6g}")
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    per_metre = (round(1000.0 / pixel_spacing[1]), round(1000.0 / pixel_spacing[0]))  # pHYs is (x, y)
    Image.fromarray(depth).save(path, format="PNG", pnginfo=info, dpi=tuple(v * 0.0254 for v in per_metre))
    return path


def write_labels_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """A labels CSV (`LABEL_COLUMNS`, and `patient_id` when the rows have it)."""
    rows = list(rows)
    columns = [*LABEL_COLUMNS, *(c for c in OPTIONAL_LABEL_COLUMNS if any(c in row for row in rows))]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: row.get(c, "") for c in columns} for row in rows)
    return path


def write_dicom_frame(path: str | Path, depth: np.ndarray, pixel_spacing: tuple[float, float], patient: Mapping[str, Any],
                      device: Mapping[str, Any], uid_seed: str) -> Path:
    """`depth` as a single-frame Secondary Capture depth image. `patient` gives PatientName,
    PatientID, PatientSex and the labels PatientWeight (kg) and PatientSize (m), any of which may
    be left out; `device` Manufacturer, ManufacturerModelName and TableHeight (mm). UIDs derive
    from `uid_seed`, so the same seed writes the same file."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    depth = np.asarray(depth)
    if depth.dtype != np.uint16 or depth.ndim != 2:
        raise ValueError(f"{path}: a depth frame is a 2-D uint16 array of mm, got {depth.dtype} {depth.shape}")
    sop_uid = generate_uid(entropy_srcs=[uid_seed, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.Modality, ds.ConversionType = DEPTH_MODALITY, "WSD"
    ds.ImageType = list(DEPTH_IMAGE_TYPE)
    ds.SeriesDescription = DEPTH_SERIES_DESCRIPTION
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    for keyword in ("PatientName", "PatientID", "PatientSex"):
        if patient.get(keyword):
            setattr(ds, keyword, str(patient[keyword]))
    for keyword in ("PatientWeight", "PatientSize"):
        if patient.get(keyword) is not None:
            setattr(ds, keyword, f"{float(patient[keyword]):.4g}")
    for keyword in ("Manufacturer", "ManufacturerModelName"):
        if device.get(keyword):
            setattr(ds, keyword, str(device[keyword]))
    if device.get("TableHeight") is not None:
        ds.TableHeight = f"{float(device['TableHeight']):.6g}"
    ds.PixelSpacing = [f"{float(v):.6g}" for v in pixel_spacing]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in depth.shape)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(depth, dtype="<u2").tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path

"""The case record: one de-identified case at a site, the same shape for every domain.

A case record is a plain dict so that it survives PySyft serialisation unchanged::

    {"case_id": str,                       pseudonymous; mock cases start with MOCK_CASE_PREFIX
     "image": float32 [Z, Y, X],           the primary image, in scanner units
     "mask": uint8 [Z, Y, X],              optional: segmentation labels on the image's grid
     "images": {str: float32 [Z, Y, X]},   optional: further images of the case on the same grid
                                           (MR T2 beside T1, CT beside MR, a depth frame)
     "labels": {str: float},               optional: scalar labels (e.g. PatientWeight in kg)
     "spacing": [z, y, x] mm (array order),
     "origin": [x, y, z] mm (patient order, centre of the first voxel),
     "direction": 9 floats, row-major 3x3 (patient order, as SimpleITK gives it),
     "metadata": {str: str | int | float}}  acquisition facts (scanner, field strength, ...)

Ingestion, the mock generators and every domain build records with `make_case_record` and check
them with `check_case_record`, so producers and consumers agree on one schema. A domain that needs
an optional part (segmentation needs "mask") asks for it with `require`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

REQUIRED_KEYS = ("case_id", "image", "spacing", "origin", "direction", "metadata")
OPTIONAL_KEYS = ("mask", "images", "labels")
MOCK_CASE_PREFIX = "mock-"

# Patient-level metadata is blanked in mock cases; scanner settings stay (they describe the site).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
PATIENT_LEVEL_METADATA = frozenset({"PatientAge", "PatientSex", "PatientWeight", "PatientSize"})


def make_case_record(
    case_id: str,
    image: np.ndarray,
    mask: np.ndarray | None,
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: Sequence[float],
    metadata: Mapping[str, Any] | None = None,
    *,
    images: Mapping[str, np.ndarray] | None = None,
    labels: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Build a record with the exact types the schema promises; optional parts given as None are left out."""
    record: dict[str, Any] = {
        "case_id": str(case_id),
        "image": np.ascontiguousarray(image, dtype=np.float32),
        "spacing": [float(v) for v in spacing],
        "origin": [float(v) for v in origin],
        "direction": [float(v) for v in direction],
        "metadata": dict(metadata or {}),
    }
    if mask is not None:
        record["mask"] = np.ascontiguousarray(mask, dtype=np.uint8)
    if images:
        record["images"] = {str(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in images.items()}
    if labels:
        record["labels"] = {str(k): float(v) for k, v in labels.items()}
    check_case_record(record)
    return record


def check_case_record(record: Mapping[str, Any], require: Sequence[str] = ()) -> None:
    """Fail early, naming the case and the key, when a site hands over something a domain cannot use.

    `require` names optional parts the caller needs (e.g. ("mask",) for segmentation).
    """
    case_id = record.get("case_id", "<no case_id>")
    missing = [key for key in (*REQUIRED_KEYS, *require) if key not in record or record[key] is None]
    if missing:
        raise ValueError(f"case {case_id}: missing keys {missing}; a case record needs {list(REQUIRED_KEYS) + list(require)}")
    image = record["image"]
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise ValueError(f"case {case_id}: 'image' must be a 3-D numpy array [Z, Y, X]")
    mask = record.get("mask")
    if mask is not None and (not isinstance(mask, np.ndarray) or mask.shape != image.shape):
        raise ValueError(f"case {case_id}: 'mask' must be a numpy array shaped like the image {image.shape}")
    for name, other in (record.get("images") or {}).items():
        if not isinstance(other, np.ndarray) or other.shape != image.shape:
            raise ValueError(f"case {case_id}: images['{name}'] must be a numpy array shaped like the image {image.shape}")
    for name, value in (record.get("labels") or {}).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
            raise ValueError(f"case {case_id}: labels['{name}'] must be a finite number, got {value!r}")
    if len(record["spacing"]) != 3 or len(record["origin"]) != 3 or len(record["direction"]) != 9:
        raise ValueError(f"case {case_id}: need 3 spacing values, 3 origin values and 9 direction values")


def mock_case_id(index: int) -> str:
    """The case id of the `index`-th mock case: recognisably not a real (pseudonymous) id."""
    return f"{MOCK_CASE_PREFIX}{index:04d}"


def is_mock_case(record: Mapping[str, Any]) -> bool:
    return str(record.get("case_id", "")).startswith(MOCK_CASE_PREFIX)


def template_shape(template: Mapping[str, Any]) -> tuple[int, int, int]:
    """The [Z, Y, X] shape a mock case copies: a case record's image shape, or a manifest entry's `shape`
    (a site's case store lists its cases without their pixels)."""
    if "image" in template:
        return tuple(int(n) for n in template["image"].shape)
    return tuple(int(n) for n in template["shape"])


def mock_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata schema of a real case with its patient-level values blanked."""
    return {k: ("" if k in PATIENT_LEVEL_METADATA else v) for k, v in metadata.items()}


def record_affine(record: dict[str, Any]) -> np.ndarray:
    """4x4 voxel-to-world matrix (RAS, as MONAI expects) of a record's [Z, Y, X] array.

    The record states spacing in array order and origin/direction in patient (LPS) order, so the
    array's axis 0 runs along the direction's third column, axis 2 along its first."""
    direction = np.asarray(record["direction"], dtype=float).reshape(3, 3)
    spacing_z, spacing_y, spacing_x = (float(v) for v in record["spacing"])
    affine = np.eye(4)
    affine[:3, 0] = direction[:, 2] * spacing_z
    affine[:3, 1] = direction[:, 1] * spacing_y
    affine[:3, 2] = direction[:, 0] * spacing_x
    affine[:3, 3] = np.asarray(record["origin"], dtype=float)
    return _LPS_TO_RAS @ affine

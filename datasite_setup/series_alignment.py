"""Put a second image of a patient (CT beside MR, T2 beside T1) on the grid of the case's primary image.

A multi-image case holds all its images on one voxel grid, so a model or a radiomics mask reads the
same voxel in each. Two series can be placed on one grid by their patient coordinates alone only when
they share a frame of reference (DICOM FrameOfReferenceUID: the scanner, or a registration the
hospital made, put them in one coordinate system); otherwise that would be a guess, so ingestion
groups series by `frame_of_reference` and never aligns across frames. Resampling is linear, with
voxels outside the second image's field of view set to its minimum (air on CT), and it is never
done silently: the ingestion report names the series that joined a case and the grid it came from.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from datasite_setup.dicom_series import Geometry


def frame_of_reference(header: Dataset) -> str | None:
    """The series' FrameOfReferenceUID: only series sharing one are aligned (None: never aligned)."""
    value = header.get("FrameOfReferenceUID")
    return str(value) if value else None


def _sitk_image(volume: np.ndarray, geometry: Geometry) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
    image.SetSpacing(tuple(float(v) for v in geometry.spacing[::-1]))
    image.SetOrigin(tuple(float(v) for v in geometry.origin))
    image.SetDirection(tuple(float(v) for v in geometry.direction))
    return image


def resample_onto(volume: np.ndarray, geometry: Geometry, target: Geometry) -> np.ndarray:
    """`volume` (on `geometry`) sampled at the voxel centres of `target`: float32 [Z, Y, X] of target's shape."""
    if geometry.mismatch(target) is None:
        return np.asarray(volume, dtype=np.float32)
    moving = _sitk_image(volume, geometry)
    reference = _sitk_image(np.zeros(target.shape, np.float32), target)
    resampled = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkLinear, float(np.min(volume)), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)

"""Masks given as files (NIfTI, NRRD, MetaImage, DICOM SEG), checked against their image series.

Nothing is resampled: a mask is accepted only on exactly the series' grid (size, spacing, origin,
direction, within 1e-3 mm), because a mask that has to be moved onto the image was drawn on
something else, and silently moving it changes the features computed under it. Any other grid is
an error naming both grids. A mask must be binary: 0 and one label value (label maps with several
structures are refused, as are DICOM SEGs with more than one segment or FRACTIONAL ones).

Finding a series' mask in a `--masks DIR` folder (top level only, hidden files skipped): a file
matches when its name without the suffix (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd, .dcm) equals,
in this order, the first that exists of
  1. the series' SeriesInstanceUID;
  2. the series' folder name: the folder holding its files, or that folder's parent when it is
     named `image` or `images` (so `STS_001/image/*.dcm` matches `STS_001.nii.gz`);
  3. the series' PatientID (convenient when each patient has one series; when a patient has
     several, the geometry check refuses the mask on the series it was not drawn on).
Names match exactly (case-sensitive). Two files for the same name (`a.nii.gz` and `a.nrrd`) are
an error rather than a guess.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from datasite_setup.dicom_series import SEG_SOP_CLASS, DicomSeries, Geometry, read_dicom

MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
_SERIES_SUBFOLDERS = {"image", "images"}
_TOLERANCE_MM = 1e-3


class MaskError(ValueError):
    """A mask file that cannot be used for this series; the message names the file and says why."""


def mask_stem(path: Path) -> str | None:
    """The name a mask file is matched by, or None if the suffix is not a mask format."""
    lower = path.name.lower()
    for suffix in MASK_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def mask_keys(series: DicomSeries) -> list[str]:
    """The names a mask for this series may have, most specific first (see the module docstring)."""
    folder = series.folder
    folder_name = folder.parent.name if folder.name.lower() in _SERIES_SUBFOLDERS else folder.name
    keys = [series.series_uid, folder_name, str(series.header.get("PatientID") or "")]
    return [key for i, key in enumerate(keys) if key and key not in keys[:i]]


def find_mask(masks_dir: Path, series: DicomSeries) -> Path | None:
    """The mask file in `masks_dir` named after this series, or None."""
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise NotADirectoryError(f"{masks_dir}: the --masks folder does not exist or is not a folder")
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(masks_dir.iterdir()):
        stem = mask_stem(path)
        if stem and path.is_file() and not path.name.startswith("."):
            by_stem.setdefault(stem, []).append(path)
    for key in mask_keys(series):
        candidates = by_stem.get(key, [])
        if len(candidates) > 1:
            raise MaskError(f"{masks_dir}: several mask files are named {key!r} "
                            f"({', '.join(p.name for p in candidates)}); keep one")
        if candidates:
            return candidates[0]
    return None


def read_mask(path: Path, series: DicomSeries) -> np.ndarray:
    """The mask as uint8 [Z, Y, X] (0/1) on the series grid, after checking it is that grid."""
    path = Path(path)
    if path.name.lower().endswith(".dcm"):
        return read_seg(path, series)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise MaskError(f"{path}: unreadable mask file ({str(exc).strip().splitlines()[-1]})") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise MaskError(f"{path}: a mask must be one 3-D scalar volume; this file has {image.GetDimension()} "
                        f"dimensions and {image.GetNumberOfComponentsPerPixel()} component(s) per voxel")
    grid = Geometry(
        shape=tuple(image.GetSize()[::-1]),
        spacing=tuple(image.GetSpacing()[::-1]),
        origin=tuple(image.GetOrigin()),
        direction=tuple(image.GetDirection()),
    )
    what = grid.mismatch(series.geometry, _TOLERANCE_MM)
    if what:
        raise MaskError(f"{path}: the mask's grid does not match the image series' ({what} differs): mask "
                        f"{grid.describe()}; series in {series.folder}: {series.geometry.describe()}. Masks are "
                        "not resampled: export the mask on the image's own grid")
    return _binary(path, sitk.GetArrayFromImage(image))


def seg_referenced_series_uids(seg: Dataset) -> list[str]:
    """The image series a DICOM SEG was drawn on."""
    return [str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])
            if item.get("SeriesInstanceUID")]


def read_seg(path: Path, series: DicomSeries) -> np.ndarray:
    """A binary one-segment DICOM SEG as uint8 [Z, Y, X], each frame placed on the slice at its position."""
    try:
        ds = read_dicom(path)
    except Exception as exc:  # pydicom raises many types on damaged files
        raise MaskError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
    if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS:
        raise MaskError(f"{path}: not a DICOM SEG (SOPClassUID (0008,0016) is {ds.get('SOPClassUID')}); "
                        "DICOM masks must be Segmentation Storage objects")
    segments = ds.get("SegmentSequence", [])
    if len(segments) != 1:
        raise MaskError(f"{path}: DICOM SEG with {len(segments)} segments is not supported; export a SEG "
                        "with the one structure to analyse")
    if ds.get("SegmentationType") != "BINARY":
        raise MaskError(f"{path}: SegmentationType (0062,0001) {ds.get('SegmentationType')} is not supported; "
                        "only BINARY SEGs are")
    try:
        frames = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
    except Exception as exc:  # decoders raise many types
        raise MaskError(f"{path}: truncated or unreadable Pixel Data (7FE0,0010) "
                        f"({type(exc).__name__}: {exc})") from exc
    geometry = series.geometry
    depth, rows, cols = geometry.shape
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    if len(per_frame) != len(frames):
        raise MaskError(f"{path}: {len(frames)} frames but {len(per_frame)} PerFrameFunctionalGroupsSequence "
                        "(5200,9230) items; the SEG is damaged")
    to_voxel = np.linalg.inv(geometry.voxel_to_patient())
    mask = np.zeros(geometry.shape, dtype=bool)
    for number, (frame, group) in enumerate(zip(frames, per_frame), start=1):
        orientation = _functional(group, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        pixel_spacing = _functional(group, shared, "PixelMeasuresSequence", "PixelSpacing")
        position = _functional(group, shared, "PlanePositionSequence", "ImagePositionPatient")
        seg_grid = (f"SEG frame {number}: {cols}x{rows} pixels of {pixel_spacing} mm at {position} mm, "
                    f"orientation {orientation}")
        if None in (orientation, pixel_spacing, position):
            raise MaskError(f"{path}: {seg_grid}: missing plane position, orientation or pixel spacing; the frame "
                            "cannot be placed")
        index = to_voxel[:3, :3] @ np.array(position) + to_voxel[:3, 3]
        k = int(np.rint(index[2]))
        placed = geometry.voxel_to_patient() @ np.array([0.0, 0.0, k, 1.0])
        on_grid = (
            frame.shape == (rows, cols)
            and 0 <= k < depth
            and np.allclose(placed[:3], position, rtol=0.0, atol=_TOLERANCE_MM)
            and np.allclose(pixel_spacing, geometry.spacing[1:], rtol=0.0, atol=_TOLERANCE_MM)
            and np.allclose(orientation, np.array(geometry.direction).reshape(3, 3)[:, :2].T.ravel(),
                            rtol=0.0, atol=_TOLERANCE_MM)
        )
        if not on_grid:
            raise MaskError(f"{path}: the SEG's grid does not match the image series' ({seg_grid}; series in "
                            f"{series.folder}: {geometry.describe()}). Masks are not resampled: export the SEG "
                            "on the image's own grid")
        mask[k] |= frame.astype(bool)
    return _binary(path, mask.astype(np.uint8))


def _functional(group: Dataset, shared: Dataset, sequence: str, keyword: str) -> list[float] | None:
    for source in (group, shared):
        items = source.get(sequence)
        if items and items[0].get(keyword) is not None:
            return [float(v) for v in items[0].get(keyword)]
    return None


def _binary(path: Path, values: np.ndarray) -> np.ndarray:
    labels = np.unique(values)
    nonzero = labels[labels != 0]
    if nonzero.size == 0:
        return np.zeros(values.shape, np.uint8)  # no lesion in this case: a valid negative
    if nonzero.size > 1:
        shown = ", ".join(f"{v:g}" for v in labels[:10]) + (", ..." if labels.size > 10 else "")
        raise MaskError(f"{path}: a label map with values {shown} is not supported; export one binary mask "
                        "(0 and one label) for the structure to analyse")
    return (values != 0).astype(np.uint8)

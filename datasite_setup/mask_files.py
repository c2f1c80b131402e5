"""Masks given as files (NIfTI, NRRD, MetaImage, DICOM SEG), checked against their image series.

Nothing is resampled: a mask is accepted only on exactly the series' grid (size, spacing, origin,
direction, within 1e-3 mm), because a mask that has to be moved onto the image was drawn on
something else, and silently moving it changes the features computed under it. Any other grid is
an error naming both grids. By default a mask must be binary: 0 and one label value (label maps with
several structures are refused, as are DICOM SEGs with more than one segment). FRACTIONAL SEGs are
always refused: a probability is not a drawn structure.

A mask of several structures (liver and lesion) is read when the structures are named, in order
(`--structures liver,lesion`): the result is a label map, 0 background and v the v-th structure
(1-based), a later structure painted over an earlier one where both claim a voxel (a lesion inside
the liver stays lesion). A label-map file is accepted as it is when its values are within 0..n for
n structures; a SEG's segments are matched to the structures by SegmentLabel, and segments none of
the structures names are left out and listed (`LabelMap.other`), never merged into one. Names match
as ROI names do (`matching_names`): exactly, else ignoring case and surrounding spaces.

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

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class LabelMap:
    """A mask as a label map: voxel value v is the v-th structure asked for, 0 background (a binary
    mask is the label map of its one structure).

    `other` names what the source held besides those structures (SEG segments, RTSTRUCT ROIs); it
    was not used, and the ingestion report lists it so that nothing is dropped unseen.
    """

    values: np.ndarray
    other: tuple[str, ...] = ()


def check_structures(structures: Sequence[str]) -> tuple[str, ...]:
    """The structure names of a label map, in label order, after checking each can name one label.

    Names are compared ignoring case (as they are matched), so two that differ only in case would
    claim the same ROI or segment twice; a uint8 mask holds at most 255 labels.
    """
    names = tuple(str(name).strip() for name in structures)
    if not names or any(not name for name in names):
        raise ValueError(f"--structures needs one or more non-empty names, in label order (e.g. liver,lesion); "
                         f"got {list(structures)!r}")
    folded = [name.casefold() for name in names]
    repeated = sorted({name for name, key in zip(names, folded) if folded.count(key) > 1})
    if repeated:
        raise ValueError(f"--structures names {', '.join(map(repr, repeated))} more than once (names are matched "
                         "ignoring case); give each structure once")
    if len(names) > 255:
        raise ValueError(f"--structures gives {len(names)} names; a uint8 label map holds at most 255 structures")
    return names


def matching_names(names: Sequence[str], wanted: str) -> list[int]:
    """Indices of the names equal to `wanted`: exact matches, else matches ignoring case and
    surrounding spaces (exports change case; a looser rule would pair the wrong structure)."""
    exact = [i for i, name in enumerate(names) if name == wanted]
    if exact:
        return exact
    key = wanted.strip().casefold()
    return [i for i, name in enumerate(names) if name.strip().casefold() == key]


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
    return _binary(path, _read_volume(path, series))


def read_label_map(path: Path, series: DicomSeries, structures: Sequence[str]) -> LabelMap:
    """A mask file of the structures, in order, as a uint8 label map on the series grid.

    A volume file is taken as it is when its values are 0..len(structures); a DICOM SEG is read
    segment by segment (`read_seg_structures`).
    """
    path = Path(path)
    if path.name.lower().endswith(".dcm"):
        return read_seg_structures(path, series, structures)
    return LabelMap(_label_values(path, _read_volume(path, series), structures))


def _read_volume(path: Path, series: DicomSeries) -> np.ndarray:
    """The voxel values of a volume file, after checking it lies on the series grid."""
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
    return sitk.GetArrayFromImage(image)


def seg_referenced_series_uids(seg: Dataset) -> list[str]:
    """The image series a DICOM SEG was drawn on."""
    return [str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])
            if item.get("SeriesInstanceUID")]


def read_seg(path: Path, series: DicomSeries) -> np.ndarray:
    """A binary one-segment DICOM SEG as uint8 [Z, Y, X], each frame placed on the slice at its position."""
    ds = _read_seg(path)
    segments = ds.get("SegmentSequence", [])
    if len(segments) != 1:
        raise MaskError(f"{path}: DICOM SEG with {len(segments)} segments is not supported; export a SEG "
                        "with the one structure to analyse, or name the structures to keep, in label order, with "
                        "--structures NAME,NAME")
    _check_binary(path, ds)
    mask = np.zeros(series.geometry.shape, dtype=bool)
    for _, k, frame, _ in _placed_frames(path, ds, series):
        mask[k] |= frame.astype(bool)
    return _binary(path, mask.astype(np.uint8))


def read_seg_structures(path: Path, series: DicomSeries, structures: Sequence[str]) -> LabelMap:
    """A BINARY DICOM SEG as a label map of the structures: segment labelled like the v-th structure
    (SegmentLabel) -> value v, frames placed as `read_seg` places them; other segments left out."""
    ds = _read_seg(path)
    _check_binary(path, ds)
    values, other = _segment_values(path, ds, structures)
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    defined = {int(item.SegmentNumber) for item in ds.SegmentSequence}
    only = next(iter(defined)) if len(defined) == 1 else None
    labels = np.zeros(series.geometry.shape, dtype=np.uint8)
    for number, k, frame, group in _placed_frames(path, ds, series):
        segment = _frame_segment(path, number, group, shared, only)
        if segment not in defined:
            raise MaskError(f"{path}: frame {number} belongs to segment {segment} (ReferencedSegmentNumber "
                            "(0062,000B)), which SegmentSequence (0062,0002) does not define; the SEG is damaged: "
                            "export it again")
        value = values.get(segment, 0)
        if value:
            np.maximum(labels[k], frame.astype(bool) * np.uint8(value), out=labels[k])
    return LabelMap(labels, other)


def _read_seg(path: Path) -> Dataset:
    try:
        ds = read_dicom(path)
    except Exception as exc:  # pydicom raises many types on damaged files
        raise MaskError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
    if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS:
        raise MaskError(f"{path}: not a DICOM SEG (SOPClassUID (0008,0016) is {ds.get('SOPClassUID')}); "
                        "DICOM masks must be Segmentation Storage objects")
    return ds


def _check_binary(path: Path, ds: Dataset) -> None:
    if ds.get("SegmentationType") != "BINARY":
        raise MaskError(f"{path}: SegmentationType (0062,0001) {ds.get('SegmentationType')} is not supported; "
                        "only BINARY SEGs are")


def _segment_values(path: Path, ds: Dataset, structures: Sequence[str]) -> tuple[dict[int, int], tuple[str, ...]]:
    """SegmentNumber -> label value of the segments the structures name, and the other segments."""
    numbers, names = [], []
    for item in ds.get("SegmentSequence", []):
        if item.get("SegmentNumber") is None:
            raise MaskError(f"{path}: a SegmentSequence (0062,0002) item has no SegmentNumber (0062,0004), so its "
                            "frames cannot be told apart; the SEG is damaged: export it again")
        numbers.append(int(item.SegmentNumber))
        names.append(str(item.get("SegmentLabel", "")))
    values: dict[int, int] = {}
    for value, structure in enumerate(structures, start=1):
        matches = matching_names(names, structure)
        if len(matches) > 1:
            raise MaskError(f"{path}: segments {', '.join(str(numbers[i]) for i in matches)} are all labelled "
                            f"{structure!r} (SegmentLabel (0062,0005)); relabel them so each structure is one segment")
        if matches:
            values[numbers[matches[0]]] = value
    listing = ", ".join(f"{number} {name!r}" for number, name in zip(numbers, names)) or "none"
    if not values:
        raise MaskError(f"{path}: none of the structures {', '.join(map(repr, structures))} is a segment of this SEG "
                        f"(its segments by SegmentLabel (0062,0005): {listing}); name the structures in --structures "
                        "as the SEG labels them")
    other = tuple(f"segment {number} {name!r}" for number, name in zip(numbers, names) if number not in values)
    return values, other


def _frame_segment(path: Path, number: int, group: Dataset, shared: Dataset, only: int | None) -> int:
    """The SegmentNumber of frame `number` (1-based), from its SegmentIdentificationSequence."""
    for source in (group, shared):
        items = source.get("SegmentIdentificationSequence")
        if items and items[0].get("ReferencedSegmentNumber") is not None:
            return int(items[0].ReferencedSegmentNumber)
    if only is not None:
        return only  # a SEG of one segment: every frame is that segment's
    raise MaskError(f"{path}: frame {number} has no SegmentIdentificationSequence (0062,000A) > "
                    "ReferencedSegmentNumber (0062,000B) in its PerFrameFunctionalGroupsSequence (5200,9230) item, so "
                    "its segment is unknown; export the SEG again with per-frame segment identification")


def _placed_frames(path: Path, ds: Dataset, series: DicomSeries) -> Iterator[tuple[int, int, np.ndarray, Dataset]]:
    """(frame number, slice index, frame, per-frame group) of each frame, once it is shown to lie on
    one of the series' slices with the series' pixel grid."""
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
        yield number, k, frame, group


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
                        "(0 and one label) for the structure to analyse, or name the label map's structures, in "
                        "label order, with --structures NAME,NAME")
    return (values != 0).astype(np.uint8)


def _label_values(path: Path, values: np.ndarray, structures: Sequence[str]) -> np.ndarray:
    found = np.unique(values)
    bad = found[~((found == np.rint(found)) & (found >= 0) & (found <= len(structures)))]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in found[:10]) + (", ..." if found.size > 10 else "")
        named = ", ".join(f"{v} {name}" for v, name in enumerate(structures, start=1))
        raise MaskError(f"{path}: label map with values {shown}, but --structures gives {len(structures)} "
                        f"structure(s) (0 background, {named}), so {', '.join(f'{v:g}' for v in bad[:10])} "
                        "names no structure; name every structure of the label map in --structures, in label order")
    return values.astype(np.uint8)

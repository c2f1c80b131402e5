"""Rasterise one ROI of an RTSTRUCT, or several as one label map, onto the voxel grid of its image series.

Contours are placed by their patient coordinates, not by their per-contour image references
(ContourImageSequence): real structure sets often reference SOP Instance UIDs that no longer exist
because an archive or anonymiser rewrote them, while the coordinates stay right. Each contour
point goes through the inverse of the series' voxel-to-patient affine; the contour lands on the
nearest slice and is filled by voxel centre (skimage's point-in-polygon rule, the one MIRP and most
radiomics tools use). Several contours on one slice combine by XOR (even-odd), so a contour inside
another one is a hole.

A contour that lies between slices (more than half a slice spacing off the nearest one), outside
the image, or that is not parallel to the slices is an error, not silently clipped: the mask would
no longer be the structure that was drawn.

An RTSTRUCT is paired with its series through ReferencedFrameOfReferenceSequence >
RTReferencedStudySequence > RTReferencedSeriesSequence > SeriesInstanceUID.

Several structures (`rasterize_structures`, liver then lesion) become one label map: each ROI is
rasterised as above and painted with its structure's value, later structures over earlier ones.
A structure set without one of the ROIs has no voxels of it (a liver without lesion is a valid
case); one with none of them is not the mask asked for, and is an error naming the ROIs it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from skimage.measure import points_in_poly

from datasite_setup.dicom_series import DicomSeries, decimal_values, read_dicom
from datasite_setup.mask_files import LabelMap, matching_names

_EDGE_TOLERANCE = 1e-3  # voxels: points exactly on the outer edge of the image are inside it
# Margin of the scanline fill, per squared coordinate scale: pixel centres this near an outline
# crossing (more for flat edges) and rows this near a vertex get skimage's own point test. Float
# error in a crossing is ~1e-16 x scale squared / edge height, so the margin is 10^7 times wider.
_NEAR = 1e-9


class RTStructError(ValueError):
    """An RTSTRUCT that cannot become a mask for this series; the message says why and what to do."""


def read_rtstruct(path: Path) -> Dataset:
    """Read a structure set, with a message naming the file if it is not one."""
    try:
        ds = read_dicom(path)
    except Exception as exc:  # pydicom raises many types on damaged files
        raise RTStructError(f"{path}: unreadable RTSTRUCT ({type(exc).__name__}: {exc})") from exc
    if "StructureSetROISequence" not in ds or "ROIContourSequence" not in ds:
        raise RTStructError(f"{path}: not an RTSTRUCT with contours (no StructureSetROISequence (3006,0020) or "
                            "ROIContourSequence (3006,0039))")
    return ds


def referenced_series_uids(rtstruct: Dataset) -> list[str]:
    """The image series the structure set was drawn on."""
    uids = []
    for frame in rtstruct.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                if series.get("SeriesInstanceUID"):
                    uids.append(str(series.SeriesInstanceUID))
    return uids


def roi_names(rtstruct: Dataset) -> list[str]:
    return [str(item.get("ROIName", "")) for item in rtstruct.StructureSetROISequence]


def select_roi(rtstruct: Dataset, roi: str | None, source: str = "RTSTRUCT") -> tuple[int, str]:
    """(ROINumber, ROIName) of the ROI asked for, or of the only one; never a guess among several."""
    rois = [(int(item.ROINumber), str(item.get("ROIName", ""))) for item in rtstruct.StructureSetROISequence]
    listing = ", ".join(repr(name) for _, name in rois) or "none"
    if roi is None:
        if len(rois) == 1:
            return rois[0]
        raise RTStructError(f"{source}: {len(rois)} ROIs ({listing}); choose one with --roi NAME")
    matches = matching_names([name for _, name in rois], roi)
    if len(matches) > 1:
        raise RTStructError(f"{source}: several ROIs are named {roi!r}; rename them so the name is unique")
    if matches:
        return rois[matches[0]]
    raise RTStructError(f"{source}: no ROI named {roi!r}; its ROIs are: {listing}")


def has_any_roi(rtstruct: Dataset, names: Sequence[str]) -> bool:
    """Whether the structure set has an ROI of one of these names (matched as `select_roi` does)."""
    rois = roi_names(rtstruct)
    return any(matching_names(rois, name) for name in names)


def rasterize_roi(rtstruct: Dataset, series: DicomSeries, roi: str | None = None,
                  source: str = "RTSTRUCT") -> np.ndarray:
    """The ROI as a uint8 [Z, Y, X] mask on the series grid (`source` names the file in errors)."""
    return _rasterize(rtstruct, series, *select_roi(rtstruct, roi, source), source)


def rasterize_structures(rtstruct: Dataset, series: DicomSeries, structures: Sequence[str],
                         source: str = "RTSTRUCT") -> LabelMap:
    """The ROIs named `structures` as one uint8 label map: ROI of the v-th structure -> value v.

    A structure whose ROI is absent has no voxels; the ROIs none of the structures names are
    listed in `other`. Where ROIs overlap the later structure wins, so a lesion drawn inside the
    liver stays lesion.
    """
    rois = [(int(item.ROINumber), str(item.get("ROIName", ""))) for item in rtstruct.StructureSetROISequence]
    names = [name for _, name in rois]
    chosen: list[tuple[int, tuple[int, str]]] = []
    for value, structure in enumerate(structures, start=1):
        matches = matching_names(names, structure)
        if len(matches) > 1:
            raise RTStructError(f"{source}: several ROIs are named {structure!r} "
                                f"({', '.join(repr(names[i]) for i in matches)}); rename them so the name is unique")
        if matches:
            chosen.append((value, rois[matches[0]]))
    if not chosen:
        listing = ", ".join(repr(name) for name in names) or "none"
        raise RTStructError(f"{source}: none of the structures {', '.join(map(repr, structures))} is an ROI of this "
                            f"structure set (StructureSetROISequence (3006,0020) ROIName: {listing}); name the "
                            "structures in --structures as the structure set names its ROIs")
    labels = np.zeros(series.geometry.shape, dtype=np.uint8)
    for value, (number, name) in chosen:
        labels[_rasterize(rtstruct, series, number, name, source).astype(bool)] = value
    used = {number for _, (number, _) in chosen}
    return LabelMap(labels, tuple(f"ROI {name!r}" for number, name in rois if number not in used))


def _rasterize(rtstruct: Dataset, series: DicomSeries, number: int, name: str, source: str) -> np.ndarray:
    where = f"{source}, ROI {name!r}"
    _check_frame_of_reference(rtstruct, number, series, where)
    contours = _closed_contours(rtstruct, number, where)
    geometry = series.geometry
    depth, rows, cols = geometry.shape
    to_voxel = np.linalg.inv(geometry.voxel_to_patient())
    mask = np.zeros(geometry.shape, dtype=bool)
    for index, points in contours:
        ijk = points @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        k = int(np.clip(np.rint(ijk[:, 2].mean()), 0, depth - 1))
        off = float(np.abs(ijk[:, 2] - k).max())
        label = f"{where}: contour {index} (first point at ({', '.join(f'{v:.1f}' for v in points[0])}) mm)"
        if off > 0.5:
            raise RTStructError(f"{label} lies {off:.2f} slice spacings ({off * geometry.spacing[0]:.2f} mm) off "
                                f"the nearest image slice ({k}): beyond the series' first or last slice, or not "
                                "parallel to the slices; check that the RTSTRUCT was drawn on this series")
        low, high = -0.5 - _EDGE_TOLERANCE, np.array([cols, rows]) - 0.5 + _EDGE_TOLERANCE
        if np.any(ijk[:, :2] < low) or np.any(ijk[:, :2] > high):
            raise RTStructError(f"{label} lies (partly) outside the image ({geometry.describe()}); the mask "
                                "would be cut off: check that the RTSTRUCT belongs to this series")
        _toggle_polygon(mask[k], ijk[:, 0], ijk[:, 1])
    if contours and not mask.any():
        raise RTStructError(f"{where}: the contours enclose no voxel centre; the mask would be empty")
    return mask.astype(np.uint8)


def _toggle_polygon(plane: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """XOR into `plane` the pixels that `skimage.draw.polygon(y, x, plane.shape)` returns, faster.

    skimage tests every pixel of the bounding box against every edge, the slowest part of ingestion
    for smooth contours with hundreds of points. Here each row is filled between the outline's
    crossings of that row (even-odd, like skimage's ray test). Pixel centres within a float-error
    margin of a crossing, and whole rows that pass near a vertex, are decided by the very point test
    skimage's polygon uses (`points_in_poly`, edges and vertices inside), so the pixels are the same.
    """
    rows, cols = plane.shape
    r0, r1 = int(max(0, y.min())), min(rows - 1, int(np.ceil(y.max())))
    c0, c1 = int(max(0, x.min())), min(cols - 1, int(np.ceil(x.max())))
    if r1 < r0 or c1 < c0:
        return
    height, width = r1 - r0 + 1, c1 - c0 + 1
    scale = _NEAR * (1.0 + max(float(np.abs(x).max()), float(np.abs(y).max()), 1.0) ** 2)
    x_prev, y_prev = np.roll(x, 1), np.roll(y, 1)
    centres = np.arange(r0, r1 + 1, dtype=np.float64)
    row, edge = np.nonzero((y > centres[:, None]) != (y_prev > centres[:, None]))
    dy = y_prev[edge] - y[edge]
    crossing = x[edge] + (centres[row] - y[edge]) * (x_prev[edge] - x[edge]) / dy
    toggles = np.zeros((height, width + 1), dtype=np.int32)
    np.add.at(toggles, (row, np.clip(np.floor(crossing).astype(np.int64) + 1 - c0, 0, width)), 1)
    inside = (np.cumsum(toggles[:, :width], axis=1) & 1).astype(bool)

    doubtful = np.zeros((height, width), dtype=bool)
    margin = scale * (1.0 + 1.0 / np.abs(dy))
    first = np.maximum(np.ceil(crossing - margin), c0).astype(np.int64) - c0
    last = np.minimum(np.floor(crossing + margin), c1).astype(np.int64) - c0
    for r, a, b in zip(row[first <= last], first[first <= last], last[first <= last]):
        doubtful[r, a:b + 1] = True
    near_vertex = np.abs(y - np.rint(y)) <= scale
    for r in np.unique(np.rint(y[near_vertex])).astype(np.int64):
        if r0 <= r <= r1:
            doubtful[r - r0] = True
    if doubtful.any():
        rr, cc = np.nonzero(doubtful)
        points = np.column_stack([cc + c0, rr + r0]).astype(np.float64)
        inside[rr, cc] = points_in_poly(points, np.column_stack([x, y]))
    plane[r0:r1 + 1, c0:c1 + 1] ^= inside


def _check_frame_of_reference(rtstruct: Dataset, number: int, series: DicomSeries, where: str) -> None:
    item = next(i for i in rtstruct.StructureSetROISequence if int(i.ROINumber) == number)
    theirs = item.get("ReferencedFrameOfReferenceUID")
    mine = series.header.get("FrameOfReferenceUID")
    if theirs and mine and str(theirs) != str(mine):
        raise RTStructError(f"{where}: drawn in another frame of reference than the image series (folder "
                            f"{series.folder}); its coordinates do not apply to these images")


def _closed_contours(rtstruct: Dataset, number: int, where: str) -> list[tuple[int, np.ndarray]]:
    roi_contour = next((item for item in rtstruct.ROIContourSequence
                        if int(item.get("ReferencedROINumber", -1)) == number), None)
    if roi_contour is None or not roi_contour.get("ContourSequence"):
        return []  # a declared ROI without contours: a case with no lesion, a valid negative
    contours = []
    for index, contour in enumerate(roi_contour.ContourSequence, start=1):
        if contour.get("ContourGeometricType", "CLOSED_PLANAR") != "CLOSED_PLANAR":
            continue
        try:
            data = np.array([float(v) for v in decimal_values(contour, "ContourData")])
        except ValueError as exc:
            raise RTStructError(f"{where}: contour {index} has malformed ContourData (3006,0050): {exc}") from exc
        if data.size == 0 or data.size % 3:
            raise RTStructError(f"{where}: contour {index} has malformed ContourData (3006,0050): "
                                f"{data.size} numbers, not a multiple of 3")
        contours.append((index, data.reshape(-1, 3)))
    if not contours:
        raise RTStructError(f"{where}: the ROI has no CLOSED_PLANAR contours (points or open lines only)")
    return contours

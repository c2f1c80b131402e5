"""Turn a hospital's DICOM folder (and an optional mask folder) into de-identified case records.

A pure read: nothing is written or uploaded here, so the same call serves a dry run, the report
an operator reviews, and the upload. Every accepted image series that has a mask becomes one case
record; everything else is in `rejected` (a problem to fix) or `ignored` (objects that are not
used, such as an SR or a structure set whose series is not in the tree), each with its reason.

Where a series' mask comes from, first match wins: a file in `--masks` named after the series
(see `mask_files`), as the operator pointed at it explicitly; else an RTSTRUCT in the tree that
references the series; else a DICOM SEG in the tree that references it. Several candidates of the
same kind (two RTSTRUCTs with the asked ROI, two SEGs) are an error rather than a guess.

The records hold pixels, grid and de-identified metadata only (see `deidentify`). `accepted`,
`rejected` and `ignored` hold local file paths, which may carry patient names: they are for the
site's operator and stay at the site.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from datasite_setup.deidentify import acquisition_metadata, case_id, check_secret, pseudonymous_uids
from datasite_setup.dicom_series import DicomSeries, scan_folder
from datasite_setup.mask_files import MaskError, find_mask, mask_keys, read_mask, read_seg, seg_referenced_series_uids
from datasite_setup.rtstruct import RTStructError, rasterize_roi, read_rtstruct, referenced_series_uids, select_roi


@dataclass
class IngestResult:
    cases: list[dict[str, Any]] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    ignored: list[dict[str, str]] = field(default_factory=list)

    def to_report(self) -> dict[str, Any]:
        """What happened to every input, as JSON-ready data (no pixels)."""
        return {
            "n_cases": len(self.cases),
            "accepted": [dict(item) for item in self.accepted],
            "rejected": [dict(item) for item in self.rejected],
            "ignored": [dict(item) for item in self.ignored],
        }


def read_cases(dicom_dir: Path, masks_dir: Path | None, secret: bytes, roi: str | None = None,
               progress: bool = True) -> IngestResult:
    """Read, pair with masks, validate and de-identify every case under `dicom_dir`."""
    check_secret(secret)
    if masks_dir is not None and not Path(masks_dir).is_dir():
        raise NotADirectoryError(f"{masks_dir}: the --masks folder does not exist or is not a folder")
    scan = scan_folder(Path(dicom_dir), progress=progress)
    result = IngestResult(rejected=[asdict(r) for r in scan.rejected], ignored=[asdict(r) for r in scan.ignored])
    structure_sets = _by_series(scan.rtstructs, read_rtstruct, referenced_series_uids, "RTSTRUCT", result)
    segs = _by_series(scan.segs, _read_dataset, seg_referenced_series_uids, "SEG", result)

    for series in scan.series:
        try:
            found = _find_mask(series, masks_dir, structure_sets, segs, roi)
        except (RTStructError, MaskError) as exc:
            result.rejected.append({"path": str(series.folder), "reason": f"{exc}; the series was rejected"})
            continue
        if found is None:
            result.rejected.append({"path": str(series.folder), "reason": _no_mask_reason(series, masks_dir)})
            continue
        mask, source = found
        _add_case(result, series, mask, source, secret)

    used = {s.series_uid for s in scan.series}
    for kind, index in (("RTSTRUCT", structure_sets), ("SEG", segs)):
        for uid, items in index.items():
            if uid not in used:
                for path, _ in items:
                    result.ignored.append({"path": str(path), "reason": (
                        f"{kind} references series UID {uid}, which is not among the accepted image series "
                        "(absent from the tree, or rejected: see its entry)")})
    return result


def _read_dataset(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types on damaged files
        raise MaskError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc


def _by_series(paths: list[Path], read: Callable[[Path], Dataset], referenced: Callable[[Dataset], list[str]],
               kind: str, result: IngestResult) -> dict[str, list[tuple[Path, Dataset]]]:
    """Index mask objects by the series UID they reference; unreadable or unpaired ones are reported."""
    index: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in paths:
        try:
            ds = read(path)
        except (RTStructError, MaskError) as exc:
            result.rejected.append({"path": str(path), "reason": str(exc)})
            continue
        uids = referenced(ds)
        if not uids:
            result.rejected.append({"path": str(path), "reason": (
                f"{path.name}: the {kind} references no image series (no SeriesInstanceUID in its references), "
                "so it cannot be paired; export it again from the contouring system")})
        for uid in dict.fromkeys(uids):
            index.setdefault(uid, []).append((path, ds))
    return index


def _find_mask(series: DicomSeries, masks_dir: Path | None, structure_sets: dict[str, list[tuple[Path, Dataset]]],
               segs: dict[str, list[tuple[Path, Dataset]]], roi: str | None) -> tuple[np.ndarray, Path] | None:
    if masks_dir is not None:
        path = find_mask(Path(masks_dir), series)
        if path is not None:
            return read_mask(path, series), path
    candidates = structure_sets.get(series.series_uid, [])
    if len(candidates) > 1 and roi is not None:
        candidates = [(path, ds) for path, ds in candidates if _has_roi(ds, roi)] or candidates[:1]
    if len(candidates) > 1:
        raise RTStructError(f"several RTSTRUCTs reference this series ({', '.join(str(p) for p, _ in candidates)}); "
                            "keep one in the tree, or pass --roi with a name only one of them has")
    if candidates:
        path, ds = candidates[0]
        return rasterize_roi(ds, series, roi, source=str(path)), path
    seg_candidates = segs.get(series.series_uid, [])
    if len(seg_candidates) > 1:
        raise MaskError(f"several DICOM SEGs reference this series ({', '.join(str(p) for p, _ in seg_candidates)}); "
                        "keep one in the tree")
    if seg_candidates:
        path, _ = seg_candidates[0]
        return read_seg(path, series), path
    return None


def _has_roi(ds: Dataset, roi: str) -> bool:
    try:
        select_roi(ds, roi)
    except RTStructError:
        return False
    return True


def _no_mask_reason(series: DicomSeries, masks_dir: Path | None) -> str:
    names = " or ".join(f"{key}.nii.gz" for key in mask_keys(series))
    where = f"in --masks ({masks_dir})" if masks_dir is not None else "in a folder passed as --masks"
    return (f"no mask found for series (folder {series.folder}): put an RTSTRUCT referencing series UID "
            f"{series.series_uid} in the tree or a mask named {names} {where}")


def _add_case(result: IngestResult, series: DicomSeries, mask: np.ndarray, source: Path, secret: bytes) -> None:
    header = series.header
    record = {
        "case_id": case_id(header, secret),
        "image": series.volume,
        "mask": mask,
        "spacing": [float(v) for v in series.spacing],
        "origin": [float(v) for v in series.origin],
        "direction": [float(v) for v in series.direction],
        "metadata": {**acquisition_metadata(header), **pseudonymous_uids(header, secret)},
    }
    result.cases.append(record)
    result.accepted.append({
        "case_id": record["case_id"],
        "folder": str(series.folder),
        "n_slices": int(series.volume.shape[0]),
        "shape": [int(n) for n in series.volume.shape],
        "mask": str(source),
        "mask_voxels": int(mask.sum()),
    })

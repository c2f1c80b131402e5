"""Turn a hospital's DICOM folder (and an optional mask folder) into de-identified case records.

A pure read: nothing is written or uploaded here, so the same call serves a dry run, the report
an operator reviews, and the upload. Every accepted image series that has a mask becomes one case
record; everything else is in `rejected` (a problem to fix) or `ignored` (objects that are not
used, such as an SR or a structure set whose series is not in the tree), each with its reason.
Every file under the DICOM folder is listed in exactly one entry's `files`, so an operator can
find any file's fate (a structure set or SEG serving several accepted series is listed with each
of their cases), and the summary counts add up to the files read.

Where a series' mask comes from, first match wins: a file in `--masks` named after the series
(see `mask_files`), as the operator pointed at it explicitly; else an RTSTRUCT in the tree that
references the series; else a DICOM SEG in the tree that references it. Several candidates of the
same kind (two RTSTRUCTs with the asked ROI, two SEGs) are an error rather than a guess.

The records hold pixels, grid and de-identified metadata only (see `deidentify`). `accepted`,
`rejected` and `ignored` hold local file paths, which may carry patient names: they are for the
site's operator and stay at the site.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from datasite_setup.deidentify import acquisition_metadata, case_id, check_secret, pseudonymous_uids
from datasite_setup.dicom_series import DicomSeries, read_dicom, scan_folder
from datasite_setup.mask_files import MaskError, find_mask, mask_keys, read_mask, read_seg, seg_referenced_series_uids
from datasite_setup.rtstruct import RTStructError, rasterize_roi, read_rtstruct, referenced_series_uids, select_roi
from domains.case_record import make_case_record


@dataclass
class IngestResult:
    """The case records, and an entry for every input file (`files`: all files under the DICOM folder)."""

    files: list[str] = field(default_factory=list)
    cases: list[dict[str, Any]] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    ignored: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        """How many input files ended accepted, rejected or ignored, and how many cases they made."""
        outcomes = {"accepted": self.accepted, "rejected": self.rejected, "ignored": self.ignored}
        counts = {name: len({f for entry in entries for f in entry["files"]}) for name, entries in outcomes.items()}
        return {"files": len(self.files), **counts, "cases": len(self.cases)}

    def to_report(self) -> dict[str, Any]:
        """What happened to every input file, as JSON-ready data (no pixels)."""
        return {
            "summary": self.summary(),
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
    result = IngestResult(files=[str(p) for p in scan.files],
                          rejected=[_entry(r.path, r.reason, r.files) for r in scan.rejected],
                          ignored=[_entry(r.path, r.reason, r.files) for r in scan.ignored])
    structure_sets = _by_series(scan.rtstructs, read_rtstruct, referenced_series_uids, "RTSTRUCT", result)
    segs = _by_series(scan.segs, _read_dataset, seg_referenced_series_uids, "SEG", result)
    in_tree = {path for index in (structure_sets, segs) for items in index.values() for path, _ in items}

    mask_of: dict[str, Path] = {}  # accepted series UID -> the file its mask came from
    failed: list[tuple[DicomSeries, str, list[Path]]] = []
    for series in scan.series:
        candidates = [path for index in (structure_sets, segs) for path, _ in index.get(series.series_uid, [])]
        try:
            found = _find_mask(series, masks_dir, structure_sets, segs, roi)
        except (RTStructError, MaskError) as exc:
            failed.append((series, f"{exc}; the series was rejected", candidates))
            continue
        if found is None:
            failed.append((series, _no_mask_reason(series, masks_dir), candidates))
            continue
        mask, source = found
        mask_of[series.series_uid] = source
        _add_case(result, series, mask, source, secret, source_in_tree=source in in_tree)

    claimed = set(mask_of.values()) & in_tree
    for series, reason, candidates in failed:
        involved = [path for path in dict.fromkeys(candidates) if path not in claimed]
        claimed.update(involved)
        result.rejected.append(_entry(series.folder, reason, [*series.files, *involved]))
    for kind, index in (("RTSTRUCT", structure_sets), ("SEG", segs)):
        for path, uids in _uids_by_path(index).items():
            if path not in claimed:
                claimed.add(path)
                result.ignored.append(_entry(path, _unused_mask_reason(kind, uids, mask_of), [path]))
    return result


def _entry(path: str | Path, reason: str, files: Iterable[str | Path]) -> dict[str, Any]:
    return {"path": str(path), "reason": reason, "files": [str(f) for f in files]}


def _uids_by_path(index: dict[str, list[tuple[Path, Dataset]]]) -> dict[Path, list[str]]:
    by_path: dict[Path, list[str]] = {}
    for uid, items in index.items():
        for path, _ in items:
            by_path.setdefault(path, []).append(uid)
    return by_path


def _unused_mask_reason(kind: str, uids: list[str], mask_of: dict[str, Path]) -> str:
    taken = [uid for uid in uids if uid in mask_of]
    if taken:
        return (f"{kind} not used: series {taken[0]} took its mask from {mask_of[taken[0]]} (a file in --masks "
                "comes first, then an RTSTRUCT with the --roi, then a SEG); remove it if it is a stale copy")
    return (f"{kind} references series UID {', '.join(uids)}, which is not among the accepted image series "
            "(absent from the tree, or rejected: see its entry)")


def _read_dataset(path: Path) -> Dataset:
    try:
        return read_dicom(path)
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
            result.rejected.append(_entry(path, str(exc), [path]))
            continue
        uids = referenced(ds)
        if not uids:
            result.rejected.append(_entry(path, (
                f"{path.name}: the {kind} references no image series (no SeriesInstanceUID in its references), "
                "so it cannot be paired; export it again from the contouring system"), [path]))
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


def _add_case(result: IngestResult, series: DicomSeries, mask: np.ndarray, source: Path, secret: bytes,
              source_in_tree: bool) -> None:
    header = series.header
    record = make_case_record(
        case_id(header, secret), series.volume, mask, series.spacing, series.origin, series.direction,
        {**acquisition_metadata(header), **pseudonymous_uids(header, secret)},
    )
    result.cases.append(record)
    result.accepted.append({
        "case_id": record["case_id"],
        "folder": str(series.folder),
        "n_slices": int(series.volume.shape[0]),
        "shape": [int(n) for n in series.volume.shape],
        "mask": str(source),
        "mask_voxels": int(mask.sum()),
        "files": [str(p) for p in [*series.files, *([source] if source_in_tree else [])]],
    })

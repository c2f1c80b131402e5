"""Turn a hospital's DICOM folder (and an optional mask folder) into de-identified case records.

A pure read: nothing is written or uploaded here, so the same pass serves a dry run, the report
an operator reviews, and the case store (`upload`), which takes the cases one by one as
`Ingestion.cases()` yields them. Every accepted image series that has a mask becomes one case
record; everything else is in `rejected` (a problem to fix) or `ignored` (objects that are not
used, such as an SR or a structure set whose series is not in the tree), each with its reason.
Every file under the DICOM folder is listed in exactly one entry's `files`, so an operator can
find any file's fate (a structure set or SEG serving several accepted series is listed with each
of their cases), and the summary counts add up to the files read.

Multi-image cases: a primary series (`PrimarySeries`) carries the case; the other series that share
its frame of reference join it as further images, resampled onto its grid (`series_alignment`),
and the case's mask is the primary series' mask. Two ways to name the primary series:
- `--primary-modality MR`: every MR series is primary, and series of another modality in its frame
  (CT beside MR of the same patient) join it as `images["CT"]`; everything else is as without it.
- `--primary-series-description T1` (with `--primary-modality`, of that modality too): the series
  whose SeriesDescription is T1 (case and surrounding spaces ignored, no partial match) is primary,
  and every other series in its frame joins, a series of the primary's modality under its
  SeriesDescription made an identifier (de-identified as the metadata is: T2 -> `images["T2"]`,
  "AX T2 FLAIR" -> `images["AX_T2_FLAIR"]`), one of another modality under its modality. Only
  primary series become cases: a series in a frame without one is ignored, with the reason, and
  two primary series in one frame are both rejected, naming each other (which would the case be?).
A further image's name repeated in one case gets -2, -3 in series order (SeriesNumber, then UID).

Where a series' mask comes from, first match wins: a file in `--masks` named after the series
(see `mask_files`), as the operator pointed at it explicitly; else an RTSTRUCT in the tree that
references the series; else a DICOM SEG in the tree that references it. Several candidates of the
same kind (two RTSTRUCTs with the asked ROI, two SEGs) are an error rather than a guess.

Masks of several structures: with `structures` (`--structures liver,lesion`) every mask is read as
a label map, 0 background and v the v-th structure (`mask_files`, `rtstruct.rasterize_structures`),
and each case carries the names in that order (`IngestedCase.mask_labels`, which the manifest
lists). An RTSTRUCT or SEG holding none of the structures is not the case's mask (the series is
rejected with the names it has); the report lists per case the voxels of each structure, so a
case without lesion shows as such, and what the mask's source held besides the structures.

The records hold pixels, grid and de-identified metadata only (see `deidentify`). `accepted`,
`rejected` and `ignored` hold local file paths, which may carry patient names: they are for the
site's operator and stay at the site.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from datasite_setup.deidentify import acquisition_metadata, case_id, check_secret, patient_pseudonym, pseudonymous_uids
from datasite_setup.dicom_series import DicomSeries, read_dicom, scan_folder
from datasite_setup.mask_files import (
    LabelMap,
    MaskError,
    check_structures,
    find_mask,
    mask_keys,
    read_label_map,
    read_mask,
    read_seg,
    read_seg_structures,
    seg_referenced_series_uids,
)
from datasite_setup.rtstruct import (
    RTStructError,
    has_any_roi,
    rasterize_roi,
    rasterize_structures,
    read_rtstruct,
    referenced_series_uids,
    select_roi,
)
from datasite_setup.series_alignment import frame_of_reference, resample_onto
from domains.case_record import make_case_record


@dataclass
class IngestResult:
    """The case records, and an entry for every input file (`files`: all files under the DICOM folder)."""

    files: list[str] = field(default_factory=list)
    cases: list[dict[str, Any]] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    ignored: list[dict[str, Any]] = field(default_factory=list)
    n_cases: int = 0  # accepted cases, whether `cases` holds them or they were streamed to the case store

    def summary(self) -> dict[str, int]:
        """How many input files ended accepted, rejected or ignored, and how many cases they made."""
        outcomes = {"accepted": self.accepted, "rejected": self.rejected, "ignored": self.ignored}
        counts = {name: len({f for entry in entries for f in entry["files"]}) for name, entries in outcomes.items()}
        return {"files": len(self.files), **counts, "cases": self.n_cases}

    def to_report(self) -> dict[str, Any]:
        """What happened to every input file, as JSON-ready data (no pixels)."""
        return {
            "summary": self.summary(),
            "accepted": [dict(item) for item in self.accepted],
            "rejected": [dict(item) for item in self.rejected],
            "ignored": [dict(item) for item in self.ignored],
        }


@dataclass(frozen=True)
class PrimarySeries:
    """Which series carries a multi-image case: those of `modality` (`--primary-modality`), or those
    whose SeriesDescription is `description` (`--primary-series-description`; of `modality` too
    when both are given). The others in its frame of reference join its case."""

    modality: str | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        if self.modality is not None and not self.modality.strip():
            raise ValueError("--primary-modality is empty; give a DICOM Modality such as MR, or leave it out")
        if self.description is not None and not self.description.strip():
            raise ValueError("--primary-series-description is empty; give the SeriesDescription of the primary series (e.g. T1)")
        if self.modality is None and self.description is None:
            raise ValueError("a primary series needs --primary-modality, --primary-series-description or both")

    def matches(self, header: Dataset) -> bool:
        """Whether a series (by one of its headers) is a primary series."""
        if self.modality is not None and str(header.get("Modality", "")).strip().upper() != self.modality.strip().upper():
            return False
        return self.description is None or _folded(header.get("SeriesDescription", "")) == _folded(self.description)

    def describe(self) -> str:
        """How reasons name a primary series: "MR series", "series described 'T1'"."""
        modality = f"{self.modality.strip().upper()} " if self.modality is not None else ""
        described = f" described '{self.description.strip()}'" if self.description is not None else ""
        return f"{modality}series{described}"

    @property
    def option(self) -> str:
        """The command-line option that made it, for reasons that suggest leaving it out."""
        return "--primary-series-description" if self.description is not None else "--primary-modality"


def primary_series(modality: str | None, description: str | None = None) -> PrimarySeries | None:
    """The primary series the `--primary-modality` and `--primary-series-description` options name
    (None: neither given, every series is its own case)."""
    if modality is None and description is None:
        return None
    return PrimarySeries(modality, description)


def _folded(text: object) -> str:
    return str(text).strip().casefold()


@dataclass(frozen=True)
class IngestedCase:
    """One accepted case: its de-identified record, its patient's pseudonym (which fixes its split)
    and the names of its mask's label values 1, 2, ... (empty for a binary mask)."""

    record: dict[str, Any]
    patient: str
    mask_labels: tuple[str, ...] = ()


class Ingestion:
    """One pass over a DICOM folder: headers and mask objects first, then one series at a time.

    `cases()` yields each accepted case as soon as its series is read and paired with its mask, so
    memory holds one series however large the export; `result` fills in as it goes and accounts for
    every file once `cases()` is exhausted.
    """

    def __init__(self, dicom_dir: Path, masks_dir: Path | None, secret: bytes, roi: str | None = None,
                 progress: bool = True, primary_modality: str | PrimarySeries | None = None, structures: Sequence[str] = (),
                 primary_series_description: str | None = None) -> None:
        """`primary_modality` is a modality or a whole `PrimarySeries` (how `upload` hands the
        command line's choice through); `primary_series_description` adds a SeriesDescription to a modality."""
        check_secret(secret)
        if isinstance(primary_modality, PrimarySeries):
            if primary_series_description is not None:
                raise ValueError("give the SeriesDescription inside the PrimarySeries, not beside it")
            self.primary: PrimarySeries | None = primary_modality
        else:
            self.primary = primary_series(primary_modality, primary_series_description)
        if roi is not None and structures:
            raise ValueError(f"--roi {roi!r} and --structures {','.join(structures)} exclude each other: --roi picks "
                             "one ROI for a binary mask, --structures names every structure of a label map; give "
                             "the ROI as one of the structures instead")
        self.structures = check_structures(structures) if structures else ()
        if masks_dir is not None and not Path(masks_dir).is_dir():
            raise NotADirectoryError(f"{masks_dir}: the --masks folder does not exist or is not a folder")
        self.masks_dir, self.secret, self.roi, self.progress = masks_dir, secret, roi, progress
        self.scan = scan_folder(Path(dicom_dir), progress=progress, load=False)
        self.result = IngestResult(files=[str(p) for p in self.scan.files],
                                   rejected=[_entry(r.path, r.reason, r.files) for r in self.scan.rejected],
                                   ignored=[_entry(r.path, r.reason, r.files) for r in self.scan.ignored])
        self._scan_rejections_seen = len(self.scan.rejected)
        self.structure_sets = _by_series(self.scan.rtstructs, read_rtstruct, referenced_series_uids, "RTSTRUCT", self.result)
        self.segs = _by_series(self.scan.segs, _read_dataset, seg_referenced_series_uids, "SEG", self.result)
        self.joining, self.ambiguous, self.unused = self._group_series()

    def _series_files(self, uid: str) -> list[Path]:
        return [*self.scan.pending.get(uid, []), *(p for p, _ in self.scan.damaged.get(uid, []))]

    def _group_series(self) -> tuple[dict[str, list[str]], dict[str, str], dict[str, str]]:
        """With a primary series: each primary series' UID -> the other series in its frame of
        reference, which join its case as further images (in series order); and, when primary
        series are picked by SeriesDescription, the series that make no case, with the reason:
        primary series sharing a frame with another (rejected) and series in a frame without one
        (ignored). A series with no readable header is read like any other (and rejected there)."""
        if self.primary is None:
            return {}, {}, {}
        primaries: dict[str | None, list[str]] = {}
        others: dict[str | None, list[str]] = {}
        headers: dict[str, Dataset] = {}
        for uid in self.scan.series_uids:
            header = self.scan.first_header(uid)
            if header is None:
                continue
            headers[uid] = header
            frame = frame_of_reference(header)
            if frame is None and self.primary.description is None:
                continue  # without a frame of reference a series is its own case, as without a primary modality
            (primaries if self.primary.matches(header) else others).setdefault(frame, []).append(uid)
        for uids in (*primaries.values(), *others.values()):
            uids.sort(key=lambda uid: _series_order(headers[uid], uid))
        joining = {uid: others[frame] for frame, uids in primaries.items() if frame is not None and frame in others
                   for uid in uids}
        if self.primary.description is None:
            return joining, {}, {}
        ambiguous = {uid: self._ambiguity_reason(frame, uids) for frame, uids in primaries.items()
                     if frame is not None and len(uids) > 1 for uid in uids}
        unused = {uid: self._no_primary_reason(uid, headers[uid], frame) for frame, uids in others.items()
                  if frame is None or frame not in primaries for uid in uids}
        return joining, ambiguous, unused

    def _ambiguity_reason(self, frame: str, uids: list[str]) -> str:
        listed = ", ".join(f"series {uid} (folder {_folder(self._series_files(uid))})" for uid in uids)
        return (f"{'both' if len(uids) == 2 else 'all'} of {listed} are {self.primary.describe()} in frame of reference "
                f"{frame}, and a case has one primary image, so none became a case: remove or re-describe all but one, "
                "or name another series with --primary-series-description")

    def _no_primary_reason(self, uid: str, header: Dataset, frame: str | None) -> str:
        described = f"series {uid} (SeriesDescription '{str(header.get('SeriesDescription', '')).strip()}')"
        if frame is None:
            return (f"{described} is not a {self.primary.describe()} and has no FrameOfReferenceUID, so it joins no "
                    f"case; ingest it without {self.primary.option} to make it a case of its own")
        return (f"{described} is not a {self.primary.describe()}, and no {self.primary.describe()} shares its frame of "
                f"reference {frame}, so it joins no case; check the spelling of {self.primary.option}, or ingest "
                f"without it to make each series a case of its own")

    def _further_images(self, series: DicomSeries, joined: dict[str, str]) -> dict[str, tuple[np.ndarray, DicomSeries]]:
        """The series joining `series`' case, each resampled onto its grid, keyed by `_image_key`."""
        images: dict[str, tuple[np.ndarray, DicomSeries]] = {}
        for other in self.scan.each_series(False, self.joining.get(series.series_uid, [])):
            key = _image_key(other.header, series.header, images)
            images[key] = (resample_onto(other.volume, other.geometry, series.geometry), other)
            joined[other.series_uid] = series.series_uid
        return images

    def cases(self) -> Iterator[IngestedCase]:
        """Each accepted case in turn; when exhausted, `result` lists every file's fate."""
        in_tree = {path for index in (self.structure_sets, self.segs) for paths in index.values() for path in paths}
        mask_of: dict[str, Path] = {}  # accepted series UID -> the file its mask came from
        joined: dict[str, str] = {}  # series UID -> the primary series whose case it joined
        failed: list[tuple[DicomSeries, str, list[Path]]] = []
        secondary = {uid for uids in self.joining.values() for uid in uids}
        left_out = secondary | set(self.ambiguous) | set(self.unused)
        for series in self.scan.each_series(self.progress, [u for u in self.scan.series_uids if u not in left_out]):
            candidates = [path for index in (self.structure_sets, self.segs) for path in index.get(series.series_uid, [])]
            try:
                found = _find_mask(series, self.masks_dir, self.structure_sets, self.segs, self.roi, self.structures)
            except (RTStructError, MaskError) as exc:
                failed.append((series, f"{exc}; the series was rejected", candidates))
                continue
            if found is None:
                failed.append((series, _no_mask_reason(series, self.masks_dir), candidates))
                continue
            mask, source = found
            mask_of[series.series_uid] = source
            images = self._further_images(series, joined)
            yield _add_case(self.result, series, mask, source, self.secret, source_in_tree=source in in_tree,
                            images=images, structures=self.structures)
        self._account(failed, mask_of, in_tree, joined, secondary)

    def _account(self, failed: list[tuple[DicomSeries, str, list[Path]]], mask_of: dict[str, Path],
                 in_tree: set[Path], joined: dict[str, str], secondary: set[str]) -> None:
        result = self.result
        for uid, reason in self.ambiguous.items():
            result.rejected.append(_entry(_folder(self._series_files(uid)), reason, self._series_files(uid)))
        for uid, reason in self.unused.items():
            result.ignored.append(_entry(_folder(self._series_files(uid)), reason, self._series_files(uid)))
        for uid in sorted(secondary - set(joined)):
            files = self._series_files(uid)
            if files and not any(str(files[0]) in r.files for r in self.scan.rejected):
                result.ignored.append(_entry(files[0].parent, (
                    f"series {uid} was to join the case of a {self.primary.describe()} in its frame of reference, "
                    f"and that series was rejected (see its entry); fix it, or ingest without {self.primary.option}"), files))
        result.rejected.extend(_entry(r.path, r.reason, r.files) for r in self.scan.rejected[self._scan_rejections_seen:])
        claimed = set(mask_of.values()) & in_tree
        for series, reason, candidates in failed:
            involved = [path for path in dict.fromkeys(candidates) if path not in claimed]
            claimed.update(involved)
            result.rejected.append(_entry(series.folder, reason, [*series.files, *involved]))
        for kind, index in (("RTSTRUCT", self.structure_sets), ("SEG", self.segs)):
            for path, uids in _uids_by_path(index).items():
                if path not in claimed:
                    claimed.add(path)
                    result.ignored.append(_entry(path, _unused_mask_reason(kind, uids, mask_of, joined), [path]))


def read_cases(dicom_dir: Path, masks_dir: Path | None, secret: bytes, roi: str | None = None,
               progress: bool = True, primary_modality: str | PrimarySeries | None = None,
               structures: Sequence[str] = (), primary_series_description: str | None = None) -> IngestResult:
    """Read, pair with masks, validate and de-identify every case under `dicom_dir`, all in memory
    (a dry run or a small export; `Ingestion` streams them)."""
    ingestion = Ingestion(dicom_dir, masks_dir, secret, roi=roi, progress=progress, primary_modality=primary_modality,
                          structures=structures, primary_series_description=primary_series_description)
    ingestion.result.cases = [case.record for case in ingestion.cases()]
    return ingestion.result


def _entry(path: str | Path, reason: str, files: Iterable[str | Path]) -> dict[str, Any]:
    return {"path": str(path), "reason": reason, "files": [str(f) for f in files]}


def _folder(files: Sequence[Path]) -> Path:
    """The folder of a series' files (their common ancestor if they are spread out)."""
    return Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path()


def _series_order(header: Dataset, uid: str) -> tuple[int, int, str]:
    """Series order within a frame: by SeriesNumber (series without one last), then UID, so names
    and messages do not depend on file names or the order files were found in."""
    try:
        return (0, int(header.get("SeriesNumber")), uid)
    except (TypeError, ValueError):
        return (1, 0, uid)


def _image_key(other: Dataset, primary: Dataset, taken: Collection[str]) -> str:
    """The name a further image takes in its case: its modality when that differs from the primary
    series' (`images["CT"]` beside MR), else its de-identified SeriesDescription as an identifier
    (`images["T2"]` beside T1; the modality if it has none); a name already taken gets -2, -3."""
    modality = str(other.get("Modality", "")).strip().upper() or "IMAGE"
    base = modality
    if modality == str(primary.get("Modality", "")).strip().upper():
        description = str(acquisition_metadata(other).get("SeriesDescription", ""))
        base = re.sub(r"[^A-Za-z0-9]+", "_", description).strip("_") or modality
    key, number = base, 2
    while key in taken:
        key, number = f"{base}-{number}", number + 1
    return key


def _uids_by_path(index: dict[str, list[Path]]) -> dict[Path, list[str]]:
    by_path: dict[Path, list[str]] = {}
    for uid, paths in index.items():
        for path in paths:
            by_path.setdefault(path, []).append(uid)
    return by_path


def _unused_mask_reason(kind: str, uids: list[str], mask_of: dict[str, Path], joined: dict[str, str]) -> str:
    further = [uid for uid in uids if uid in joined]
    if further:
        return (f"{kind} not used: its series {further[0]} joined the case of series {joined[further[0]]} as a further "
                "image, and a case's mask comes from its primary image")
    taken = [uid for uid in uids if uid in mask_of]
    if taken:
        return (f"{kind} not used: series {taken[0]} took its mask from {mask_of[taken[0]]} (a file in --masks "
                "comes first, then an RTSTRUCT with the --roi or --structures, then a SEG); remove it if it is a "
                "stale copy")
    return (f"{kind} references series UID {', '.join(uids)}, which is not among the accepted image series "
            "(absent from the tree, or rejected: see its entry)")


def _read_dataset(path: Path) -> Dataset:
    try:
        return read_dicom(path)
    except Exception as exc:  # pydicom raises many types on damaged files
        raise MaskError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc


def _by_series(paths: list[Path], read: Callable[[Path], Dataset], referenced: Callable[[Dataset], list[str]],
               kind: str, result: IngestResult) -> dict[str, list[Path]]:
    """Index mask objects by the series UID they reference; unreadable or unpaired ones are reported.

    Only paths are kept (a structure set can be megabytes; a site has one per case): a mask object
    is read again when its series is."""
    index: dict[str, list[Path]] = {}
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
            index.setdefault(uid, []).append(path)
    return index


def _find_mask(series: DicomSeries, masks_dir: Path | None, structure_sets: dict[str, list[Path]],
               segs: dict[str, list[Path]], roi: str | None,
               structures: tuple[str, ...]) -> tuple[LabelMap, Path] | None:
    """The series' mask and the file it came from (a binary mask is a label map of one structure)."""
    if masks_dir is not None:
        path = find_mask(Path(masks_dir), series)
        if path is not None:
            mask = read_label_map(path, series, structures) if structures else LabelMap(read_mask(path, series))
            return mask, path
    candidates = [(path, read_rtstruct(path)) for path in structure_sets.get(series.series_uid, [])]
    if len(candidates) > 1 and structures:
        candidates = [(path, ds) for path, ds in candidates if has_any_roi(ds, structures)] or candidates[:1]
    elif len(candidates) > 1 and roi is not None:
        candidates = [(path, ds) for path, ds in candidates if _has_roi(ds, roi)] or candidates[:1]
    if len(candidates) > 1:
        raise RTStructError(f"several RTSTRUCTs reference this series ({', '.join(str(p) for p, _ in candidates)}); "
                            "keep one in the tree, or pass --roi (or --structures) with names only one of them has")
    if candidates:
        path, ds = candidates[0]
        if structures:
            return rasterize_structures(ds, series, structures, source=str(path)), path
        return LabelMap(rasterize_roi(ds, series, roi, source=str(path))), path
    seg_candidates = segs.get(series.series_uid, [])
    if len(seg_candidates) > 1:
        raise MaskError(f"several DICOM SEGs reference this series ({', '.join(str(p) for p in seg_candidates)}); "
                        "keep one in the tree")
    if seg_candidates:
        path = seg_candidates[0]
        mask = read_seg_structures(path, series, structures) if structures else LabelMap(read_seg(path, series))
        return mask, path
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


def _add_case(result: IngestResult, series: DicomSeries, mask: LabelMap, source: Path, secret: bytes,
              source_in_tree: bool, images: dict[str, tuple[np.ndarray, DicomSeries]],
              structures: tuple[str, ...]) -> IngestedCase:
    header = series.header
    record = make_case_record(
        case_id(header, secret), series.volume, mask.values, series.spacing, series.origin, series.direction,
        {**acquisition_metadata(header), **pseudonymous_uids(header, secret)},
        images={key: volume for key, (volume, _) in images.items()},
    )
    further = [path for _, other in images.values() for path in other.files]
    result.n_cases += 1
    accepted = {
        "case_id": record["case_id"],
        "folder": str(series.folder),
        "n_slices": int(series.volume.shape[0]),
        "shape": [int(n) for n in series.volume.shape],
        "mask": str(source),
        "mask_voxels": int(np.count_nonzero(mask.values)),
        "files": [str(p) for p in [*series.files, *([source] if source_in_tree else []), *further]],
        "images": {key: {"folder": str(other.folder), "resampled_from": other.geometry.describe(),
                         "series_description": str(acquisition_metadata(other.header).get("SeriesDescription", ""))}
                   for key, (_, other) in images.items()},
    }
    if structures:
        counts = np.bincount(mask.values.ravel(), minlength=len(structures) + 1)
        accepted["structure_voxels"] = {name: int(counts[value]) for value, name in enumerate(structures, start=1)}
        accepted["not_in_structures"] = list(mask.other)
    result.accepted.append(accepted)
    return IngestedCase(record, patient_pseudonym(header, secret), structures)

"""Read a folder tree of DICOM files into image volumes, one per series, or say why not.

Hospital exports are messy: stray files, truncated copies, a series with a lost slice, several
acquisitions sharing one SeriesInstanceUID. Most viewers still show such a series, but its
geometry is wrong and so is every feature computed from it. Here a series is therefore accepted
whole or rejected whole, and each rejection names the file, the tag and what to do about it.

Conventions are ITK/SimpleITK's (those of the NIfTI/NRRD files other tools write, so their masks
line up without resampling): `volume` is float32 [Z, Y, X] with RescaleSlope/Intercept applied;
`spacing` is (z, y, x) mm; `origin` is the patient (x, y, z) position in mm (DICOM LPS) of the
first voxel of the first slice; `direction` is the row-major 3x3 matrix (9 floats) whose columns
are the row direction, the column direction and the slice normal. Slices are sorted by their
position along the normal, so the slice axis always points along row x column.

Decisions:
- A single-slice series is rejected: it has no slice spacing, and the analyses need a volume.
- Every input file ends up in exactly one place: an accepted series, the RTSTRUCT or SEG list, a
  rejection or the ignored list. A series-level rejection lists every file of the series.
- A file that is not readable DICOM is rejected on its own. It rejects a series only when it can
  be shown to belong to it: its damaged header still names the series' SeriesInstanceUID. A
  series beside it is read as usual: a lost slice inside the stack shows as a gap (whose reason
  names the unreadable file as the likely missing slice), but a lost first or last slice cannot
  be seen, so the unreadable file's own reason asks to copy it again if it was a slice.
- Files without the 128-byte preamble and 'DICM' marker (written by older software) are read as
  pydicom reads them with `force=True`, and used only if the result is a DICOM data set (a valid
  SOP Class UID, or the tags an image slice needs); anything else is "not a DICOM file".
- Multi-frame (enhanced) images, colour images and tilted-gantry (sheared) stacks are rejected as
  not supported rather than guessed at.
- RTSTRUCT and SEG objects are listed for pairing; other non-image objects (SR, RT Dose,
  DICOMDIR, ...) are listed as ignored, not as errors.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from tqdm import tqdm

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

_REQUIRED_TAGS = {
    "SeriesInstanceUID": "(0020,000E)",
    "ImagePositionPatient": "(0020,0032)",
    "ImageOrientationPatient": "(0020,0037)",
    "PixelSpacing": "(0028,0030)",
    "Rows": "(0028,0010)",
    "Columns": "(0028,0011)",
}
_DECIMAL_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
_SERIES_UID_TAG = 0x0020000E
_DEFER_BYTES = 4096  # headers are read first; pixel data only once a series is known to be sound
_PROGRESS_MIN_FILES = 200
_SAME_POSITION_MM = 0.01
_MISSING_SLICE_FACTOR = 1.5
_SPACING_TOLERANCE = 0.01  # relative to the median slice spacing
_GRID_TOLERANCE = 1e-4  # PixelSpacing (mm) and orientation cosines across the files of a series
_TILT_TOLERANCE = 0.1  # in-plane offset between slices, in pixels
_NAMES_NO_SERIES = ("it names no series, so no series was rejected for it; if it is a slice of a series beside it, "
                    "that series may lack its first or last slice: copy the file again from the PACS")

T = TypeVar("T")


@dataclass(frozen=True)
class Rejection:
    """A file or series left out, and why.

    `path` is the file at fault (else the series folder); `files` is every input file the entry
    accounts for, so that an operator can look up any file of a rejected series, not only the
    one that caused it.
    """

    path: str
    reason: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class Geometry:
    """The voxel grid of a volume in patient space; equality of grids is what lets masks line up."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def voxel_to_patient(self) -> np.ndarray:
        """4x4 affine from (x index, y index, slice index, 1) to patient (x, y, z, 1) in mm."""
        affine = np.eye(4)
        affine[:3, :3] = np.array(self.direction).reshape(3, 3) * np.array(self.spacing[::-1])
        affine[:3, 3] = self.origin
        return affine

    def mismatch(self, other: Geometry, tolerance: float = 1e-3) -> str | None:
        """What differs from `other` (None if nothing does): resampling is never done silently."""
        if tuple(self.shape) != tuple(other.shape):
            return "size"
        checks = (("spacing", self.spacing, other.spacing), ("origin", self.origin, other.origin),
                  ("direction", self.direction, other.direction))
        for name, mine, theirs in checks:
            if not np.allclose(mine, theirs, rtol=0.0, atol=tolerance):
                return name
        return None

    def describe(self) -> str:
        """The grid as ITK tools (3D Slicer, ITK-SNAP) show it, x before y before z."""
        z, y, x = self.shape
        sz, sy, sx = self.spacing
        return (f"size {x}x{y}x{z}, spacing {sx:.4f}x{sy:.4f}x{sz:.4f} mm, "
                f"origin ({', '.join(f'{v:.3f}' for v in self.origin)}) mm, "
                f"direction ({', '.join(f'{v:.4f}' for v in self.direction)})")


@dataclass
class DicomSeries:
    """One accepted image series: its volume, its grid, its files in slice order, its header."""

    series_uid: str
    volume: np.ndarray
    geometry: Geometry
    files: list[Path]
    header: Dataset

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    @property
    def origin(self) -> tuple[float, float, float]:
        return self.geometry.origin

    @property
    def direction(self) -> tuple[float, ...]:
        return self.geometry.direction

    @property
    def folder(self) -> Path:
        """The folder holding the series' files (their common ancestor if they are spread out)."""
        return Path(os.path.commonpath([str(p.parent) for p in self.files]))


@dataclass
class ScanResult:
    """Where every input file went: each of `files` is in exactly one series, list or entry's `files`.

    A scan made with `load=False` holds no pixels: its image series are read one at a time by
    `each_series`, so a site's whole export never sits in memory at once.
    """

    files: list[Path] = field(default_factory=list)
    series: list[DicomSeries] = field(default_factory=list)
    rtstructs: list[Path] = field(default_factory=list)
    segs: list[Path] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    ignored: list[Rejection] = field(default_factory=list)
    pending: dict[str, list[Path]] = field(default_factory=dict)  # series UID -> its readable files
    damaged: dict[str, list[tuple[Path, str]]] = field(default_factory=dict)  # series UID -> (file, why)
    unassigned: dict[Path, list[Path]] = field(default_factory=dict)  # folder -> files no series claims

    @property
    def series_uids(self) -> list[str]:
        """Every series the scan found image files of, readable or not."""
        return list(dict.fromkeys([*self.pending, *self.damaged]))

    def first_header(self, uid: str) -> Dataset | None:
        """The header of one readable file of series `uid` (None if it has none)."""
        for path in self.pending.get(uid, []):
            read = _read_header(path)
            if isinstance(read, _Header):
                return read.dataset
        return None

    def each_series(self, progress: bool = True, uids: Iterable[str] | None = None) -> Iterator[DicomSeries]:
        """Read the pending series (or those of `uids`) one by one, pixels and all, yielding those
        accepted; a rejected series goes to `rejected` with every one of its files."""
        uids = self.series_uids if uids is None else list(uids)
        files_to_read = sum(len(self.pending.get(uid, [])) for uid in uids)
        bar = _progress_bar(files_to_read, "reading DICOM pixel data", progress)
        try:
            for uid in uids:
                paths, broken = self.pending.get(uid, []), self.damaged.get(uid, [])
                files = [*paths, *(p for p, _ in broken)]
                try:
                    if broken:
                        raise _broken_member_error(uid, broken, files, has_readable=bool(paths))
                    series = _load_series(uid, _reread_headers(paths, files), bar, self.unassigned)
                except _SeriesError as exc:
                    self.rejected.append(Rejection(str(exc.path), exc.reason, tuple(str(p) for p in files)))
                    continue
                yield series
        finally:
            bar.close()


class _SeriesError(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class _Header:
    """A readable file: its header (pixel data deferred), what it is, and the series of an image."""

    dataset: Dataset
    kind: str
    series_uid: str | None


@dataclass(frozen=True)
class _Unreadable:
    """A file that gave no usable data set; `series_uid` if its damaged header still names a series."""

    reason: str
    series_uid: str | None = None


@dataclass
class _Slice:
    path: Path
    header: Dataset
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    rows: int
    cols: int


def scan_folder(root: Path, progress: bool = True, load: bool = True) -> ScanResult:
    """Read every file under `root` (hidden files skipped) and sort it into series or rejections.

    With `load=False` only headers are read; the series wait in `pending` for `each_series`.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder; pass the folder that holds the DICOM files")
    paths = _files_under(root)
    result = ScanResult(files=paths)
    by_series, damaged, unassigned = result.pending, result.damaged, result.unassigned
    for path in _progress(paths, len(paths), "reading DICOM headers", progress):
        read = _read_header(path)
        if isinstance(read, _Unreadable):
            if read.series_uid:
                damaged.setdefault(read.series_uid, []).append((path, read.reason))
            else:
                result.rejected.append(Rejection(str(path), read.reason, (str(path),)))
                unassigned.setdefault(path.parent, []).append(path)
            continue
        if read.kind == "rtstruct":
            result.rtstructs.append(path)
        elif read.kind == "seg":
            result.segs.append(path)
        elif read.kind == "other":
            reason = f"{_sop_name(read.dataset)}: not an image, RTSTRUCT or SEG; ignored"
            result.ignored.append(Rejection(str(path), reason, (str(path),)))
        elif read.series_uid is None:
            result.rejected.append(Rejection(str(path), (
                f"{path.name}: missing required tag SeriesInstanceUID (0020,000E), so the slice cannot be "
                f"assigned to a series; re-export it from the PACS with its full header ({_NAMES_NO_SERIES})"),
                (str(path),)))
            unassigned.setdefault(path.parent, []).append(path)
        else:
            by_series.setdefault(read.series_uid, []).append(path)
    if load:
        result.series = list(result.each_series(progress))
    return result


def _reread_headers(paths: list[Path], files: list[Path]) -> list[tuple[Path, Dataset]]:
    """The headers of one series again (the scan keeps only paths, to hold no more than one series)."""
    members = []
    for path in paths:
        read = _read_header(path)
        if not isinstance(read, _Header) or read.kind != "image":
            raise _series_error(path, f"{path.name}: changed or became unreadable while the ingestion ran; "
                                "ingest again once the export is complete", files)
        members.append((path, read.dataset))
    return members


def _files_under(root: Path) -> list[Path]:
    """Every non-hidden file, following symlinked folders (shared storage is often linked in) once."""
    seen: set[str] = set()
    files: list[Path] = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files.extend(Path(folder) / name for name in names if not name.startswith("."))
    return sorted(files)


def _progress(items: Iterable[T], total: int, desc: str, enabled: bool) -> Iterator[T]:
    with _progress_bar(total, desc, enabled) as bar:
        for item in items:
            yield item
            bar.update()


def _progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A bar only when it helps: many files and a terminal to draw on (tqdm's `disable=None`)."""
    quiet = not enabled or total < _PROGRESS_MIN_FILES
    return tqdm(total=total, desc=desc, unit="file", disable=True if quiet else None)


def read_dicom(path: Path, defer_size: int | None = None) -> Dataset:
    """`pydicom.dcmread`, also for a file without the 128-byte preamble and 'DICM' marker.

    Older software writes such files. They are read as pydicom reads them with `force=True`; that
    read turns any bytes into some data set, so its result is used only if it is a DICOM one (a
    valid SOP Class UID, or the tags an image slice needs), else InvalidDicomError is raised.
    """
    try:
        return pydicom.dcmread(path, defer_size=defer_size)
    except InvalidDicomError:
        forced = _read_forced(path, defer_size)
        if forced is None:
            raise
        return forced


def _read_header(path: Path) -> _Header | _Unreadable:
    """The file's header (pixel data deferred) and what it is, or why it gives none."""
    try:
        ds = read_dicom(path, _DEFER_BYTES)
    except InvalidDicomError:
        return _Unreadable(
            f"{path.name}: not a DICOM file (no 'DICM' marker after the 128-byte preamble, and no DICOM data "
            "set at its start either); move it out of the DICOM folder, or re-export it as a DICOM Part 10 file")
    except Exception as exc:  # pydicom raises many types on damaged files; all mean the same here
        return _damaged(path, exc)
    try:
        kind = _kind(ds)
        uid = ds.get("SeriesInstanceUID") if kind == "image" else None
    except Exception as exc:  # pydicom converts values on access; a malformed one raises its own type
        return _damaged(path, exc)
    return _Header(ds, kind, str(uid) if uid else None)


def _read_forced(path: Path, defer_size: int | None) -> Dataset | None:
    """The data set in a file without preamble, with the transfer syntax pydicom detected, if it is DICOM."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on every odd "element" it finds in non-DICOM bytes
            ds = pydicom.dcmread(path, defer_size=defer_size, force=True)
            if not _is_dicom_dataset(ds):
                return None
    except Exception:  # not parseable even by force: not DICOM, which the caller says
        return None
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit
                                  else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.file_meta = meta
    return ds


def _is_dicom_dataset(ds: Dataset) -> bool:
    sop = ds.get("SOPClassUID")
    if sop and UID(str(sop)).is_valid:
        return True
    decimals = {name: decimal_values(ds, name) for name in _DECIMAL_TAGS}
    return "PixelData" in ds and all(_has_value(ds, name, decimals) for name in _REQUIRED_TAGS)


def _damaged(path: Path, exc: Exception) -> _Unreadable:
    reason = (f"{path.name}: unreadable DICOM file ({type(exc).__name__}: {exc}); the file is probably truncated "
              "or damaged: copy it again from the PACS")
    uid = _partial_series_uid(path)
    return _Unreadable(reason if uid else f"{reason} ({_NAMES_NO_SERIES})", uid)


def _partial_series_uid(path: Path) -> str | None:
    """SeriesInstanceUID (0020,000E) from the intact start of a damaged file, if the damage comes later."""
    try:
        with open(path, "rb") as fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_partial(fp, stop_when=lambda tag, vr, length: tag > _SERIES_UID_TAG, force=True)
            uid = ds.get("SeriesInstanceUID")
            return str(uid) if uid and UID(str(uid)).is_valid else None
    except Exception:  # damaged before the tag: the file names no series
        return None


def _broken_member_error(uid: str, broken: list[tuple[Path, str]], files: list[Path],
                         has_readable: bool) -> _SeriesError:
    path, reason = broken[0]
    consequence = "so the series lacks that slice" if has_readable else "and no readable file of that series was found"
    return _series_error(path, f"{reason}; its header names series {uid} (SeriesInstanceUID (0020,000E)), "
                         f"{consequence}", files)


def _sop_class(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None) or Dataset()
    return str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")


def _sop_name(ds: Dataset) -> str:
    sop = _sop_class(ds)
    return UID(sop).name if sop else f"object without SOP Class UID (Modality {ds.get('Modality', '?')})"


def _kind(ds: Dataset) -> str:
    sop = _sop_class(ds)
    if sop == RTSTRUCT_SOP_CLASS or ds.get("Modality") == "RTSTRUCT":
        return "rtstruct"
    if sop == SEG_SOP_CLASS or ds.get("Modality") == "SEG":
        return "seg"
    name = UID(sop).name if sop else ""
    known_class = bool(sop) and name != sop
    if name.endswith("Image Storage") or (not known_class and "PixelData" in ds):
        return "image"
    return "other"


def _where(files: list[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in files]))


def _series_error(path: Path, problem: str, files: list[Path]) -> _SeriesError:
    count = f"{len(files)} file{'s' if len(files) != 1 else ''}"
    return _SeriesError(path, f"{problem}; the whole series ({count} in {_where(files)}) was rejected")


def _load_series(uid: str, members: list[tuple[Path, Dataset]], bar: tqdm,
                 unassigned: dict[Path, list[Path]]) -> DicomSeries:
    files = [path for path, _ in members]
    slices = []
    for path, ds in members:
        try:
            slices.append(_parse_slice(path, ds, files))
        except _SeriesError:
            raise
        except Exception as exc:  # pydicom converts values on access; a malformed one raises its own type
            raise _series_error(path, f"{path.name}: malformed header value ({type(exc).__name__}: {exc}); "
                                "re-export the series from the PACS", files) from exc
    _check_same_grid(slices, files)
    normal = np.cross(slices[0].orientation[:3], slices[0].orientation[3:])
    slices.sort(key=lambda s: float(s.position @ normal))
    positions = np.array([s.position @ normal for s in slices])
    suspects = [bad for folder in sorted(set(p.parent for p in files)) for bad in unassigned.get(folder, [])]
    _check_stack(slices, positions, normal, files, suspects)

    first = slices[0]
    rows, cols = first.rows, first.cols
    volume = np.empty((len(slices), rows, cols), dtype=np.float32)
    for plane, item in zip(volume, slices):
        _read_pixels(item, plane, files)
        bar.update()
    spacing_z = float((positions[-1] - positions[0]) / (len(slices) - 1))
    direction = np.column_stack([first.orientation[:3], first.orientation[3:], normal])
    geometry = Geometry(
        shape=(len(slices), rows, cols),
        spacing=(spacing_z, float(first.pixel_spacing[0]), float(first.pixel_spacing[1])),
        origin=tuple(float(v) for v in first.position),
        direction=tuple(float(v) for v in direction.ravel()),
    )
    return DicomSeries(uid, volume, geometry, [s.path for s in slices], first.header)


def decimal_values(ds: Dataset, keyword: str) -> list[str | float]:
    """The values of a DS (decimal string) element, [] if absent or empty, for the caller to float().

    Read from the raw bytes while pydicom has not converted the element: its conversion builds and
    validates one DSfloat per number, the slowest part of reading slice headers and contours. The
    split is pydicom's own (latin-1 text, stripped, split at backslashes), so float() of the parts
    gives the same numbers, and the same error for a malformed one.
    """
    element = ds.get_item(keyword)
    if element is None:
        return []
    if isinstance(element, RawDataElement):
        text = (element.value or b"").decode("latin-1").strip()
        return text.split("\\") if text else []
    if isinstance(element.value, (MultiValue, list, tuple)):
        return list(element.value)
    return [] if element.value in (None, "") else [element.value]


def _parse_slice(path: Path, ds: Dataset, files: list[Path]) -> _Slice:
    decimals = {name: decimal_values(ds, name) for name in _DECIMAL_TAGS}
    missing = [f"{name} {tag}" for name, tag in _REQUIRED_TAGS.items() if not _has_value(ds, name, decimals)]
    if "PixelData" not in ds:
        missing.append("PixelData (7FE0,0010)")
    if missing:
        raise _series_error(path, f"{path.name}: missing required tag(s) {', '.join(missing)}, so the slice cannot "
                            "be placed in a volume (a truncated copy, or not a cross-sectional image); re-export "
                            "the series from the PACS with full headers", files)
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise _series_error(path, f"{path.name}: multi-frame image (NumberOfFrames (0028,0008) = {frames}) is not "
                            "supported; export the series as one file per slice (classic/legacy images)", files)
    samples = int(ds.get("SamplesPerPixel") or 1)
    photometric = str(ds.get("PhotometricInterpretation") or "")
    if samples != 1 or photometric == "PALETTE COLOR":
        colour = (f"SamplesPerPixel (0028,0002) = {samples}" if samples != 1
                  else "PhotometricInterpretation (0028,0004) = PALETTE COLOR")
        raise _series_error(path, f"{path.name}: colour image ({colour}) is not supported; only grayscale "
                            "cross-sectional images make a volume", files)
    try:
        position, orientation, pixel_spacing = (np.array([float(v) for v in decimals[name]])
                                                for name in _DECIMAL_TAGS)
    except (TypeError, ValueError) as exc:
        raise _series_error(path, f"{path.name}: unreadable geometry tag value ({exc}); re-export the series",
                            files) from exc
    shapes = (position.shape, orientation.shape, pixel_spacing.shape)
    finite = all(np.isfinite(values).all() for values in (position, orientation, pixel_spacing))
    if shapes != ((3,), (6,), (2,)) or not finite or np.any(pixel_spacing <= 0):
        raise _series_error(path, f"{path.name}: malformed ImagePositionPatient (0020,0032) {list(position)}, "
                            f"ImageOrientationPatient (0020,0037) {list(orientation)} or PixelSpacing (0028,0030) "
                            f"{list(pixel_spacing)} (expected 3, 6 and 2 finite numbers, the spacings positive); "
                            "re-export the series", files)
    row, col = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise _series_error(path, f"{path.name}: ImageOrientationPatient (0020,0037) {list(orientation)} is not two "
                            "orthogonal unit vectors; the slice cannot be placed in space", files)
    return _Slice(path, ds, position, orientation, pixel_spacing, int(ds.Rows), int(ds.Columns))


def _has_value(ds: Dataset, name: str, decimals: dict[str, list[str | float]]) -> bool:
    if name in decimals:
        return bool(decimals[name])
    return ds.get(name) not in (None, "")


def _check_same_grid(slices: list[_Slice], files: list[Path]) -> None:
    first = slices[0]
    for item in slices[1:]:
        for name, tag, mine, theirs in (
            ("Rows", "(0028,0010)", first.rows, item.rows),
            ("Columns", "(0028,0011)", first.cols, item.cols),
        ):
            if mine != theirs:
                raise _series_error(item.path, _mixed(name, tag, first.path, mine, item.path, theirs), files)
        for name, tag, mine, theirs in (
            ("PixelSpacing", "(0028,0030)", first.pixel_spacing, item.pixel_spacing),
            ("ImageOrientationPatient", "(0020,0037)", first.orientation, item.orientation),
        ):
            if not (np.abs(mine - theirs) <= _GRID_TOLERANCE).all():  # np.allclose for finite values, 5x faster
                problem = _mixed(name, tag, first.path, list(mine), item.path, list(theirs))
                raise _series_error(item.path, problem, files)


def _mixed(name: str, tag: str, first: Path, mine: object, other: Path, theirs: object) -> str:
    return (f"mixed {name} {tag} within the series: {first.name} has {mine} but {other.name} has {theirs}; a "
            "series must share one grid: split it into one series per grid, or re-export it")


def _check_stack(slices: list[_Slice], positions: np.ndarray, normal: np.ndarray, files: list[Path],
                 suspects: list[Path]) -> None:
    """Reject duplicated, missing, unevenly spaced or sheared slices; `suspects` are the unreadable
    files beside the series, named in a gap's reason as the likely missing slices."""
    steps = np.diff(positions)
    for i, step in enumerate(steps):
        if step < _SAME_POSITION_MM:
            a, b = slices[i], slices[i + 1]
            raise _series_error(b.path, f"duplicated slice position: {a.path.name} and {b.path.name} are both at "
                                f"{positions[i]:.3f} mm along the slice normal (a copied slice, or several echoes, "
                                "phases or time points sharing one SeriesInstanceUID); remove the duplicate or "
                                "split the series", files)
    if len(slices) < 2:
        raise _series_error(slices[0].path, f"{slices[0].path.name}: single-slice series; a volume of at least two "
                            "slices is needed", files)
    median = float(np.median(steps))
    for i, step in enumerate(steps):
        a, b = slices[i], slices[i + 1]
        if step > _MISSING_SLICE_FACTOR * median:
            missing = round(step / median) - 1
            likely = (f"; {_names(suspects)} beside it could not be read and may be the missing slice(s) (see "
                      "their own entries)" if suspects else "")
            raise _series_error(b.path, f"missing slice(s): a gap of {step:.3f} mm between {a.path.name} and "
                                f"{b.path.name} where the median slice spacing is {median:.3f} mm (about {missing} "
                                f"slice(s) missing){likely}; copy the complete series again from the PACS", files)
        if abs(step - median) > _SPACING_TOLERANCE * median:
            raise _series_error(b.path, f"inconsistent slice spacing: {step:.3f} mm between {a.path.name} and "
                                f"{b.path.name} where the median is {median:.3f} mm; a volume needs evenly spaced "
                                "slices: resample the series first", files)
    first = slices[0]
    limit = _TILT_TOLERANCE * float(first.pixel_spacing.min())
    for item, along in zip(slices, positions):
        offset = item.position - first.position - (along - positions[0]) * normal
        if np.linalg.norm(offset) > limit:
            raise _series_error(item.path, f"{item.path.name} is shifted {np.linalg.norm(offset):.3f} mm in-plane "
                                f"from the stack through {first.path.name} (gantry tilt or sheared stack); tilted "
                                "series are not supported: export a tilt-corrected reconstruction", files)


def _names(paths: list[Path], shown: int = 3) -> str:
    names = ", ".join(p.name for p in paths[:shown])
    return names if len(paths) <= shown else f"{names} and {len(paths) - shown} more"


def _read_pixels(item: _Slice, out: np.ndarray, files: list[Path]) -> None:
    """Decode one slice into `out` (its plane of the volume), rescaled, with pydicom's pixel handlers.

    The header parsed by the scan is reused: its Pixel Data was deferred, so only that element is
    read from the file now, and it is dropped again once decoded, so that at most one slice's
    pixel bytes are held at a time. The rescale is computed in float64 and stored as float32.
    """
    ds = item.header
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # decoders raise many types; all mean this slice is unusable
        raise _series_error(item.path, f"{item.path.name}: truncated or unreadable Pixel Data (7FE0,0010) "
                            f"({type(exc).__name__}: {exc}); copy the file again from the PACS", files) from exc
    finally:
        if "PixelData" in ds:
            del ds.PixelData
    if pixels.shape != out.shape:
        raise _series_error(item.path, f"{item.path.name}: decoded pixel data has shape {pixels.shape}, but Rows "
                            f"(0028,0010) x Columns (0028,0011) say {out.shape}; the file is damaged", files)
    try:
        slope = float(ds.get("RescaleSlope") or 1.0)
        intercept = float(ds.get("RescaleIntercept") or 0.0)
    except (TypeError, ValueError) as exc:
        raise _series_error(item.path, f"{item.path.name}: malformed RescaleSlope (0028,1053) or RescaleIntercept "
                            f"(0028,1052) ({exc}); re-export the series from the PACS", files) from exc
    if slope == 1.0 and intercept == 0.0:
        out[...] = pixels  # integers: float32 holds them exactly up to 2**24, as the float64 route would round
    else:
        scaled = np.multiply(pixels, slope, dtype=np.float64)
        scaled += intercept
        out[...] = scaled

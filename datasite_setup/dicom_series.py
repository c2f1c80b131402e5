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
- A file that is not readable DICOM is rejected, and so is every image series in the same folder:
  it may be one of their slices, and a series missing its first or last slice looks complete.
  Keep notes and other exports out of the series folders.
- Multi-frame (enhanced) images, colour images and tilted-gantry (sheared) stacks are rejected as
  not supported rather than guessed at.
- RTSTRUCT and SEG objects are listed for pairing; other non-image objects (SR, RT Dose,
  DICOMDIR, ...) are listed as ignored, not as errors.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID
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
_DEFER_BYTES = 4096  # headers are read first; pixel data only once a series is known to be sound
_PROGRESS_MIN_FILES = 200
_SAME_POSITION_MM = 0.01
_MISSING_SLICE_FACTOR = 1.5
_SPACING_TOLERANCE = 0.01  # relative to the median slice spacing
_GRID_TOLERANCE = 1e-4  # PixelSpacing (mm) and orientation cosines across the files of a series
_TILT_TOLERANCE = 0.1  # in-plane offset between slices, in pixels

T = TypeVar("T")


@dataclass(frozen=True)
class Rejection:
    """A file or series left out, and why (`path` is the file at fault, else the series folder)."""

    path: str
    reason: str


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
    series: list[DicomSeries] = field(default_factory=list)
    rtstructs: list[Path] = field(default_factory=list)
    segs: list[Path] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    ignored: list[Rejection] = field(default_factory=list)


class _SeriesError(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


@dataclass
class _Slice:
    path: Path
    header: Dataset
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    rows: int
    cols: int


def scan_folder(root: Path, progress: bool = True) -> ScanResult:
    """Read every file under `root` (hidden files skipped) and sort it into series or rejections."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder; pass the folder that holds the DICOM files")
    paths = _files_under(root)
    result = ScanResult()
    by_series: dict[str, list[tuple[Path, Dataset]]] = {}
    unreadable: dict[Path, Path] = {}
    for path in _progress(paths, len(paths), "reading DICOM headers", progress):
        ds = _read_header(path, result, unreadable)
        if ds is None:
            continue
        kind = _kind(ds)
        if kind == "rtstruct":
            result.rtstructs.append(path)
        elif kind == "seg":
            result.segs.append(path)
        elif kind == "other":
            result.ignored.append(Rejection(str(path), f"{_sop_name(ds)}: not an image, RTSTRUCT or SEG; ignored"))
        elif not ds.get("SeriesInstanceUID"):
            result.rejected.append(Rejection(str(path), (
                f"{path.name}: missing required tag SeriesInstanceUID (0020,000E), so the slice "
                "cannot be assigned to a series; re-export it from the PACS with its full header")))
            unreadable.setdefault(path.parent, path)
        else:
            by_series.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))

    n_image_files = sum(len(members) for members in by_series.values())
    bar = _progress_bar(n_image_files, "reading DICOM pixel data", progress)
    try:
        for uid, members in by_series.items():
            try:
                _refuse_beside_unreadable(members, unreadable)
                result.series.append(_load_series(uid, members, bar))
            except _SeriesError as exc:
                result.rejected.append(Rejection(str(exc.path), exc.reason))
    finally:
        bar.close()
    return result


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


def _read_header(path: Path, result: ScanResult, unreadable: dict[Path, Path]) -> Dataset | None:
    try:
        return pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except InvalidDicomError:
        reason = (f"{path.name}: not a DICOM file (no 'DICM' marker after the 128-byte preamble); "
                  "move it out of the DICOM folder, or re-export it as a DICOM Part 10 file")
    except Exception as exc:  # pydicom raises many types on damaged files; all mean the same here
        reason = (f"{path.name}: unreadable DICOM file ({type(exc).__name__}: {exc}); the file is "
                  "probably truncated or damaged: copy it again from the PACS")
    result.rejected.append(Rejection(str(path), reason))
    unreadable.setdefault(path.parent, path)
    return None


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


def _where(members: list[tuple[Path, Dataset]]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p, _ in members]))


def _series_error(path: Path, problem: str, members: list[tuple[Path, Dataset]]) -> _SeriesError:
    return _SeriesError(path, f"{problem}; the whole series ({len(members)} files in {_where(members)}) was rejected")


def _refuse_beside_unreadable(members: list[tuple[Path, Dataset]], unreadable: dict[Path, Path]) -> None:
    for folder in sorted({p.parent for p, _ in members}):
        if folder in unreadable:
            bad = unreadable[folder]
            raise _series_error(folder, f"{bad.name} in the same folder is not readable DICOM and may be one of "
                                f"this series' slices (see its own entry); remove or replace it", members)


def _load_series(uid: str, members: list[tuple[Path, Dataset]], bar: tqdm) -> DicomSeries:
    slices = [_parse_slice(path, ds, members) for path, ds in members]
    _check_same_grid(slices, members)
    normal = np.cross(slices[0].orientation[:3], slices[0].orientation[3:])
    slices.sort(key=lambda s: float(s.position @ normal))
    positions = np.array([s.position @ normal for s in slices])
    _check_stack(slices, positions, normal, members)

    first = slices[0]
    rows, cols = first.rows, first.cols
    volume = np.empty((len(slices), rows, cols), dtype=np.float32)
    for plane, item in zip(volume, slices):
        _read_pixels(item, plane, members)
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


def _parse_slice(path: Path, ds: Dataset, members: list[tuple[Path, Dataset]]) -> _Slice:
    decimals = {name: decimal_values(ds, name) for name in _DECIMAL_TAGS}
    missing = [f"{name} {tag}" for name, tag in _REQUIRED_TAGS.items() if not _has_value(ds, name, decimals)]
    if "PixelData" not in ds:
        missing.append("PixelData (7FE0,0010)")
    if missing:
        raise _series_error(path, f"{path.name}: missing required tag(s) {', '.join(missing)}, so the slice cannot "
                            "be placed in a volume (a truncated copy, or not a cross-sectional image); re-export "
                            "the series from the PACS with full headers", members)
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise _series_error(path, f"{path.name}: multi-frame image (NumberOfFrames (0028,0008) = {frames}) is not "
                            "supported; export the series as one file per slice (classic/legacy images)", members)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples != 1:
        raise _series_error(path, f"{path.name}: colour image (SamplesPerPixel (0028,0002) = {samples}) is not "
                            "supported; only grayscale cross-sectional images make a volume", members)
    try:
        position, orientation, pixel_spacing = (np.array([float(v) for v in decimals[name]])
                                                for name in _DECIMAL_TAGS)
    except (TypeError, ValueError) as exc:
        raise _series_error(path, f"{path.name}: unreadable geometry tag value ({exc}); re-export the series",
                            members) from exc
    shapes = (position.shape, orientation.shape, pixel_spacing.shape)
    finite = all(np.isfinite(values).all() for values in (position, orientation, pixel_spacing))
    if shapes != ((3,), (6,), (2,)) or not finite or np.any(pixel_spacing <= 0):
        raise _series_error(path, f"{path.name}: malformed ImagePositionPatient (0020,0032) {list(position)}, "
                            f"ImageOrientationPatient (0020,0037) {list(orientation)} or PixelSpacing (0028,0030) "
                            f"{list(pixel_spacing)} (expected 3, 6 and 2 finite numbers, the spacings positive); "
                            "re-export the series", members)
    row, col = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise _series_error(path, f"{path.name}: ImageOrientationPatient (0020,0037) {list(orientation)} is not two "
                            "orthogonal unit vectors; the slice cannot be placed in space", members)
    return _Slice(path, ds, position, orientation, pixel_spacing, int(ds.Rows), int(ds.Columns))


def _has_value(ds: Dataset, name: str, decimals: dict[str, list[str | float]]) -> bool:
    if name in decimals:
        return bool(decimals[name])
    return ds.get(name) not in (None, "")


def _check_same_grid(slices: list[_Slice], members: list[tuple[Path, Dataset]]) -> None:
    first = slices[0]
    for item in slices[1:]:
        for name, tag, mine, theirs in (
            ("Rows", "(0028,0010)", first.rows, item.rows),
            ("Columns", "(0028,0011)", first.cols, item.cols),
        ):
            if mine != theirs:
                raise _series_error(item.path, _mixed(name, tag, first.path, mine, item.path, theirs), members)
        for name, tag, mine, theirs in (
            ("PixelSpacing", "(0028,0030)", first.pixel_spacing, item.pixel_spacing),
            ("ImageOrientationPatient", "(0020,0037)", first.orientation, item.orientation),
        ):
            if not (np.abs(mine - theirs) <= _GRID_TOLERANCE).all():  # np.allclose for finite values, 5x faster
                problem = _mixed(name, tag, first.path, list(mine), item.path, list(theirs))
                raise _series_error(item.path, problem, members)


def _mixed(name: str, tag: str, first: Path, mine: object, other: Path, theirs: object) -> str:
    return (f"mixed {name} {tag} within the series: {first.name} has {mine} but {other.name} has {theirs}; a "
            "series must share one grid: split it into one series per grid, or re-export it")


def _check_stack(slices: list[_Slice], positions: np.ndarray, normal: np.ndarray,
                 members: list[tuple[Path, Dataset]]) -> None:
    steps = np.diff(positions)
    for i, step in enumerate(steps):
        if step < _SAME_POSITION_MM:
            a, b = slices[i], slices[i + 1]
            raise _series_error(b.path, f"duplicated slice position: {a.path.name} and {b.path.name} are both at "
                                f"{positions[i]:.3f} mm along the slice normal (a copied slice, or several echoes, "
                                "phases or time points sharing one SeriesInstanceUID); remove the duplicate or "
                                "split the series", members)
    if len(slices) < 2:
        raise _series_error(slices[0].path, f"{slices[0].path.name}: single-slice series; a volume of at least two "
                            "slices is needed", members)
    median = float(np.median(steps))
    for i, step in enumerate(steps):
        a, b = slices[i], slices[i + 1]
        if step > _MISSING_SLICE_FACTOR * median:
            missing = round(step / median) - 1
            raise _series_error(b.path, f"missing slice(s): a gap of {step:.3f} mm between {a.path.name} and "
                                f"{b.path.name} where the median slice spacing is {median:.3f} mm (about {missing} "
                                "slice(s) missing); copy the complete series again from the PACS", members)
        if abs(step - median) > _SPACING_TOLERANCE * median:
            raise _series_error(b.path, f"inconsistent slice spacing: {step:.3f} mm between {a.path.name} and "
                                f"{b.path.name} where the median is {median:.3f} mm; a volume needs evenly spaced "
                                "slices: resample the series first", members)
    first = slices[0]
    limit = _TILT_TOLERANCE * float(first.pixel_spacing.min())
    for item, along in zip(slices, positions):
        offset = item.position - first.position - (along - positions[0]) * normal
        if np.linalg.norm(offset) > limit:
            raise _series_error(item.path, f"{item.path.name} is shifted {np.linalg.norm(offset):.3f} mm in-plane "
                                f"from the stack through {first.path.name} (gantry tilt or sheared stack); tilted "
                                "series are not supported: export a tilt-corrected reconstruction", members)


def _read_pixels(item: _Slice, out: np.ndarray, members: list[tuple[Path, Dataset]]) -> None:
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
                            f"({type(exc).__name__}: {exc}); copy the file again from the PACS", members) from exc
    finally:
        if "PixelData" in ds:
            del ds.PixelData
    if pixels.shape != out.shape:
        raise _series_error(item.path, f"{item.path.name}: decoded pixel data has shape {pixels.shape}, but Rows "
                            f"(0028,0010) x Columns (0028,0011) say {out.shape}; the file is damaged", members)
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    if slope == 1.0 and intercept == 0.0:
        out[...] = pixels  # integers: float32 holds them exactly up to 2**24, as the float64 route would round
    else:
        scaled = np.multiply(pixels, slope, dtype=np.float64)
        scaled += intercept
        out[...] = scaled

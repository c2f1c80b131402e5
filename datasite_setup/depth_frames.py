"""Turn a clinic's folder of depth-camera frames (and a labels file) into de-identified case records.

The weight-and-height task (`domains.body_weight_height`) learns from frames of a depth camera over
the CT table, which clinics export as 16-bit PNGs with a labels CSV or as DICOM depth frames whose
headers carry PatientWeight and PatientSize (`domains.body_weight_height.frame_files` describes
both). This is the counterpart of `ingest` for them, with the same contract:

- A pure read: nothing is written here. `DepthFrameIngestion.cases()` yields each accepted frame
  as an `ingest.IngestedCase`, so `upload.store_cases` writes it to the case store exactly as it
  writes DICOM cases (each case complete or not at all), and `result` is an `ingest.IngestResult`
  whose report has the same shape as the DICOM ingestion's.
- Every file under the frames folder ends in exactly one of `accepted`, `rejected` (with the file,
  the field and what to do) or `ignored` (not a depth frame, and why). Every row of the labels
  file is used by a frame or rejected (a row naming no frame). A labels file that cannot be read
  as one (no `file,weight_kg,height_cm` header) stops the ingestion before any case is yielded.
- Labels: a PNG's come from its labels row; a DICOM frame's from PatientWeight (kg) and
  PatientSize (m, stored as cm), each completed or overridden by a non-empty cell of its labels
  row (the report names each label's source). Values outside `LABEL_RANGES` are rejected, as is
  a frame listed in two rows.
- De-identification: the case id and patient pseudonym come from the site's secret (`deidentify`)
  over the PatientID (a DICOM frame's, else the row's `patient_id`, else the frame's pixel
  digest: each such frame its own patient) and the study and series UIDs; no name, ID, path or
  date enters a record. The metadata keeps acquisition facts only (camera maker and model, pixel
  spacing, table height).

The report holds local file paths and the labels, for the site's operator; it stays at the site.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from datasite_setup import upload
from datasite_setup.case_splits import read_split_file
from datasite_setup.credentials import pseudonym_key
from datasite_setup.deidentify import acquisition_metadata, case_id, check_secret, patient_pseudonym, pseudonymous_uids
from datasite_setup.dicom_series import read_dicom
from datasite_setup.ingest import IngestedCase, IngestResult
from datasite_setup.site_config import SiteConfig
from domains import DOMAINS
from domains.body_weight_height.frame_files import (
    DEPTH_MODALITY, DEVICE_KEYS, LABEL_COLUMNS, OPTIONAL_LABEL_COLUMNS, PNG_SPACING_KEY, frame_metadata,
)
from domains.body_weight_height.preprocessing import MIN_READINGS_SHARE
from domains.case_record import make_case_record

DEPTH_DOMAIN = "body_weight_height"
LABEL_RANGES = {"weight_kg": (2.0, 350.0), "height_cm": (40.0, 230.0)}
_LABEL_WORDS = {"weight_kg": ("weight", "kg", "72.5"), "height_cm": ("height", "cm", "171")}
_DICOM_LABELS = {"weight_kg": ("PatientWeight", "(0010,1030)", 1.0), "height_cm": ("PatientSize", "(0010,1020)", 100.0)}
_MIN_PIXELS = 8
_PROGRESS_FROM_FILES = 50


class LabelsFileError(ValueError):
    """The labels file cannot be read as one; the message names the file, the line and what to do."""


class FrameError(ValueError):
    """A frame that cannot become a case; the message names the file, the field and what to do."""


@dataclass(frozen=True)
class LabelRow:
    """One row of the labels file: its line number (the header is line 1) and its cells."""

    line: int
    file: str
    cells: dict[str, str]


def read_labels_file(path: Path) -> list[LabelRow]:
    """The rows of a labels CSV (`file,weight_kg,height_cm`, optionally `patient_id`,
    `pixel_spacing_mm`); the cells are checked when their frame is."""
    path = Path(path)
    if not path.is_file():
        raise LabelsFileError(f"{path}: no such labels file; give a CSV with the columns {','.join(LABEL_COLUMNS)}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [name.strip() for name in reader.fieldnames or []]
            missing = [name for name in LABEL_COLUMNS if name not in columns]
            if missing:
                raise LabelsFileError(
                    f"{path}: the labels file lacks the column(s) {', '.join(missing)}; its first line must name the "
                    f"columns {','.join(LABEL_COLUMNS)} (optionally {', '.join(OPTIONAL_LABEL_COLUMNS)}), got "
                    f"{','.join(columns) or 'an empty line'}")
            rows = []
            for line, raw in enumerate(reader, start=2):
                cells = {str(k).strip(): (v or "").strip() for k, v in raw.items() if k is not None and isinstance(v, str)}
                if any(cells.values()):
                    rows.append(LabelRow(line, _normalised_name(cells.get("file", "")), cells))
    except UnicodeDecodeError as exc:
        raise LabelsFileError(f"{path}: not a text CSV ({exc.reason} at byte {exc.start}); save the labels as UTF-8 CSV") from exc
    except csv.Error as exc:
        raise LabelsFileError(f"{path}: not a readable CSV ({exc}); save the labels as a comma-separated file") from exc
    return rows


@dataclass
class DepthFrame:
    """A frame read from its file, before labels and de-identification."""

    path: Path
    file_format: str  # "PNG" or "DICOM"
    depth: np.ndarray  # uint16 [rows, cols], mm
    spacing: tuple[float, float] | None  # (along, across) mm
    header: Dataset  # the DICOM header; for a PNG an empty one
    metadata: dict[str, Any] = field(default_factory=dict)


def read_png_frame(path: Path) -> DepthFrame:
    """A 16-bit greyscale PNG depth frame; its spacing from the `PixelSpacing` text chunk or pHYs."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            mode, info, text = image.mode, dict(image.info), dict(getattr(image, "text", {}) or {})
            pixels = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise FrameError(f"{path.name}: not a readable PNG ({type(exc).__name__}: {exc}); export the frame again as a "
                         "16-bit greyscale PNG") from exc
    if mode not in ("I;16", "I;16B", "I;16L", "I") or (mode == "I" and (pixels.min() < 0 or pixels.max() > 65535)):
        raise FrameError(f"{path.name}: a PNG of mode {mode} ({'8-bit' if mode in ('L', 'P', 'RGB', 'RGBA', 'LA') else 'not 16-bit'}"
                         "); a depth frame must be a 16-bit greyscale PNG (mode I;16) of distances in mm: export it "
                         "from the camera software without conversion to 8 bit or colour")
    spacing = _png_spacing(path, text, info)
    metadata = {key: text[key] for key in DEVICE_KEYS if text.get(key)}
    return DepthFrame(path, "PNG", pixels.astype(np.uint16), spacing, Dataset(), metadata)


def read_dicom_frame(path: Path, ds: Dataset) -> DepthFrame:
    """A single-frame 16-bit unsigned MONOCHROME2 DICOM depth frame (already read as `ds`)."""
    problems = []
    if int(ds.get("NumberOfFrames") or 1) != 1:
        problems.append(f"NumberOfFrames (0028,0008) is {ds.NumberOfFrames}; export one depth frame per file")
    if int(ds.get("SamplesPerPixel") or 1) != 1 or str(ds.get("PhotometricInterpretation", "")) != "MONOCHROME2":
        problems.append(f"PhotometricInterpretation (0028,0004) is {ds.get('PhotometricInterpretation', 'missing')}; "
                        "a depth frame is MONOCHROME2 (larger value = farther)")
    if int(ds.get("BitsAllocated") or 0) != 16 or int(ds.get("PixelRepresentation") or 0) != 0:
        problems.append(f"BitsAllocated (0028,0100) {ds.get('BitsAllocated', 'missing')} / PixelRepresentation (0028,0103) "
                        f"{ds.get('PixelRepresentation', 'missing')}; a depth frame stores 16-bit unsigned mm")
    if problems:
        raise FrameError(f"{path.name}: " + "; ".join(problems))
    spacing_values = ds.get("PixelSpacing") or ds.get("NominalScannedPixelSpacing")
    spacing = _positive_pair(spacing_values)
    if spacing_values is not None and spacing is None:
        raise FrameError(f"{path.name}: PixelSpacing (0028,0030) {list(spacing_values)} is not two positive numbers of mm")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types on damaged or compressed pixel data
        raise FrameError(f"{path.name}: its pixel data cannot be decoded ({type(exc).__name__}: {exc}); export the frame "
                         "uncompressed") from exc
    slope, intercept = float(ds.get("RescaleSlope") or 1.0), float(ds.get("RescaleIntercept") or 0.0)
    depth = np.asarray(pixels, dtype=np.float64) * slope + intercept if (slope, intercept) != (1.0, 0.0) else pixels
    metadata = {key: ds.get(key) for key in DEVICE_KEYS if ds.get(key) not in (None, "")}
    return DepthFrame(path, "DICOM", np.clip(np.rint(depth), 0, 65535).astype(np.uint16), spacing, ds, metadata)


class DepthFrameIngestion:
    """One pass over a frames folder; `cases()` yields each accepted frame as soon as it is read
    (memory holds one frame), and `result` accounts for every file and labels row once it is exhausted.

    `structures` is empty: depth frames have no masks (what `upload` asks every ingestion)."""

    structures: tuple[str, ...] = ()

    def __init__(self, frames_dir: Path, secret: bytes, labels_file: Path | None = None, progress: bool = True) -> None:
        check_secret(secret)
        self.frames_dir, self.secret, self.progress = Path(frames_dir), secret, progress
        if not self.frames_dir.is_dir():
            raise NotADirectoryError(f"{frames_dir}: not a folder; give the folder that holds the depth frames")
        self.labels_file = None if labels_file is None else Path(labels_file)
        self.rows = read_labels_file(self.labels_file) if self.labels_file is not None else []
        self.files = sorted(p for p in self.frames_dir.rglob("*") if p.is_file())
        self.result = IngestResult(files=[str(p) for p in self.files])
        self._rows_by_key: dict[str, list[LabelRow]] = {}
        for row in self.rows:
            self._rows_by_key.setdefault(row.file, []).append(row)

    def cases(self) -> Iterator[IngestedCase]:
        """Each accepted frame in turn; when exhausted, `result` lists every file's and row's fate."""
        used_rows: set[int] = set()
        seen: dict[str, str] = {}  # case id -> the frame that made it
        names = _unique_names(self.files, self.frames_dir)
        bar = tqdm(self.files, desc="depth frames", unit="file",
                   disable=not self.progress or len(self.files) < _PROGRESS_FROM_FILES)
        for path in bar:
            if self.labels_file is not None and path.resolve() == self.labels_file.resolve():
                self.result.ignored.append(_entry(path, "the labels file (--labels), read for the frames' labels", [path]))
                continue
            kind, found = _frame_kind(path)
            if kind == "ignored":
                self.result.ignored.append(_entry(path, str(found), [path]))
                continue
            key = path.relative_to(self.frames_dir).as_posix()
            by_name = self._rows_by_key.get(path.name, []) if path.name != key and names.get(path.name) == key else []
            rows = self._rows_by_key.get(key, []) + by_name
            used_rows.update(row.line for row in rows)
            try:
                if kind == "rejected":
                    raise FrameError(str(found))
                frame = read_png_frame(path) if kind == "png" else read_dicom_frame(path, found)
                case = self._case(frame, key, rows, seen)
            except FrameError as exc:
                self.result.rejected.append(_entry(path, str(exc), [path]))
                continue
            yield case
        for row in self.rows:
            if row.line not in used_rows:
                self.result.rejected.append({**_entry(self.labels_file, (
                    f"{self.labels_file.name} line {row.line}: names frame {row.file!r}, which is not a depth frame "
                    f"under {self.frames_dir} (paths are relative to that folder); remove the row or add the frame"), []),
                    "line": row.line})

    def _case(self, frame: DepthFrame, key: str, rows: list[LabelRow], seen: dict[str, str]) -> IngestedCase:
        if len(rows) > 1:
            raise FrameError(f"{key}: listed in {len(rows)} rows of {self.labels_file.name} (lines "
                             f"{', '.join(str(r.line) for r in rows)}); keep one row per frame")
        row = rows[0] if rows else None
        depth = frame.depth
        if depth.ndim != 2 or min(depth.shape) < _MIN_PIXELS:
            raise FrameError(f"{key}: a depth frame of shape {list(depth.shape)}; a frame is a 2-D image of at least "
                             f"{_MIN_PIXELS} x {_MIN_PIXELS} pixels")
        share = float(np.count_nonzero(depth)) / depth.size
        if share < MIN_READINGS_SHARE:
            raise FrameError(f"{key}: only {share:.0%} of its pixels hold a depth reading (0 = no reading); a frame needs "
                             f"at least {MIN_READINGS_SHARE:.0%} to find the table: check the export (a mask or an "
                             "empty frame?)")
        spacing = self._spacing(frame, key, row)
        labels, sources = self._labels(frame, key, row)
        identity = _identity(frame, row, depth)
        record_id = case_id(identity, self.secret)
        if record_id in seen:
            raise FrameError(f"{key}: the same frame as {seen[record_id]} (same patient, study and series, or the same "
                             "pixels); remove the copy")
        seen[record_id] = key
        metadata = frame_metadata(spacing, frame.file_format, str(frame.metadata.get("Manufacturer", "")),
                                  str(frame.metadata.get("ManufacturerModelName", "")), _number(frame.metadata.get("TableHeight")))
        if frame.file_format == "DICOM":  # the header's acquisition facts, the frame's own (spacing as used) last
            header_facts = {k: v for k, v in acquisition_metadata(frame.header).items() if k != "ContrastBolusAgentPresent"}
            metadata = {**header_facts, **pseudonymous_uids(frame.header, self.secret), **metadata}
        record = make_case_record(record_id, depth[None].astype(np.float32), None, (1.0, *spacing), (0.0, 0.0, 0.0),
                                  (1, 0, 0, 0, 1, 0, 0, 0, 1), metadata, labels=labels)
        self.result.n_cases += 1
        self.result.accepted.append({"case_id": record_id, "path": str(frame.path), "format": frame.file_format,
                                     "shape": [1, *(int(n) for n in depth.shape)], "labels": labels,
                                     "label_sources": sources, "files": [str(frame.path)]})
        return IngestedCase(record, patient_pseudonym(identity, self.secret))

    def _spacing(self, frame: DepthFrame, key: str, row: LabelRow | None) -> tuple[float, float]:
        text = row.cells.get("pixel_spacing_mm", "") if row else ""
        if text:
            values = text.replace("x", "\\").replace("/", "\\").split("\\")
            spacing = _positive_pair(values * 2 if len(values) == 1 else values)
            if spacing is None:
                raise FrameError(f"{self.labels_file.name} line {row.line}: pixel_spacing_mm {text!r} is not a positive "
                                 "number of mm (or 'along\\across'); write the camera's mm per pixel, e.g. 8")
            return spacing
        if frame.spacing is not None:
            return frame.spacing
        where = ("PixelSpacing (0028,0030) in the DICOM header" if frame.file_format == "DICOM"
                 else f"{PNG_SPACING_KEY} text chunk or pHYs chunk in the PNG")
        raise FrameError(f"{key}: no pixel spacing: no {where} and no pixel_spacing_mm in a labels row; add a "
                         "pixel_spacing_mm column (the camera's mm per pixel) to the labels file")

    def _labels(self, frame: DepthFrame, key: str, row: LabelRow | None) -> tuple[dict[str, float], dict[str, str]]:
        labels: dict[str, float] = {}
        sources: dict[str, str] = {}
        for name, (low, high) in LABEL_RANGES.items():
            word, unit, example = _LABEL_WORDS[name]
            text = row.cells.get(name, "") if row else ""
            if text:
                source = f"{self.labels_file.name} line {row.line}"
                try:
                    value = float(text)
                except ValueError:
                    raise FrameError(f"{source}: {name} {text!r} is not a number; write the {word} in {unit}, "
                                     f"e.g. {example}") from None
            elif frame.file_format == "DICOM" and frame.header.get(_DICOM_LABELS[name][0]) not in (None, ""):
                keyword, tag, factor = _DICOM_LABELS[name]
                source = f"{key} {keyword} {tag}"
                raw = _number(frame.header.get(keyword))
                if raw is None:
                    raise FrameError(f"{source}: {frame.header.get(keyword)!r} is not a number; correct it in the export "
                                     f"or give {name} in a labels row")
                value = raw * factor
                if name == "height_cm" and not low <= value <= high and low <= raw <= high:
                    raise FrameError(f"{source} is {raw:g}, i.e. {value:g} cm: DICOM PatientSize is in metres and the "
                                     f"export seems to have written centimetres; give height_cm in a labels row")
            else:
                raise FrameError(self._no_label(frame, key, row, name))
            if not np.isfinite(value) or not low <= value <= high:
                raise FrameError(f"{source}: {name} {value:g} is outside the plausible {low:g}-{high:g} {unit}; "
                                 f"correct the {word}")
            labels[name], sources[name] = round(value, 3), source
        return labels, sources

    def _no_label(self, frame: DepthFrame, key: str, row: LabelRow | None, name: str) -> str:
        if row is not None:
            return (f"{self.labels_file.name} line {row.line}: {name} is empty"
                    + (f" and the DICOM header has no {_DICOM_LABELS[name][0]} {_DICOM_LABELS[name][1]}"
                       if frame.file_format == "DICOM" else "") + f"; fill in the {_LABEL_WORDS[name][0]} in {_LABEL_WORDS[name][1]}")
        add_row = f"add a row '{key},<weight_kg>,<height_cm>' to " + (
            self.labels_file.name if self.labels_file is not None else "a labels file passed as --labels")
        if frame.file_format == "DICOM":
            return (f"{key}: no {_DICOM_LABELS[name][0]} {_DICOM_LABELS[name][1]} in the DICOM header and no labels row "
                    f"for the frame; {add_row}")
        return f"{key}: no labels row for this frame; {add_row}"


def read_depth_frames(frames_dir: Path, secret: bytes, labels_file: Path | None = None, progress: bool = False) -> IngestResult:
    """Every case of a frames folder read, labelled and de-identified, all in memory: a dry run
    (the report without writing anything) or a small export; `DepthFrameIngestion` streams them."""
    ingestion = DepthFrameIngestion(frames_dir, secret, labels_file, progress)
    ingestion.result.cases = [case.record for case in ingestion.cases()]
    return ingestion.result


def ingest_depth_frames_to_datasite(config: SiteConfig, frames_dir: Path, labels_file: Path | None = None,
                                    dataset_name: str | None = None, domain: str = DEPTH_DOMAIN, progress: bool = True,
                                    split_file: Path | None = None) -> dict[str, Any]:
    """Read, de-identify, store and publish depth frames as `upload.ingest_to_datasite` does DICOM
    series (same case store, same incremental versions, same report keys); return the report.

    `split_file` (CSV PatientID,split) fixes the split of the patients it lists: DICOM PatientIDs,
    or the labels file's `patient_id` values."""
    if not Path(frames_dir).is_dir():
        raise ValueError(f"{frames_dir}: not a folder; give the folder that holds the depth frames")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r} for the mock cases; known domains: {', '.join(DOMAINS)}")
    name = dataset_name or upload.default_dataset_name(config)
    listed = read_split_file(split_file) if split_file is not None else None
    ingestion = DepthFrameIngestion(Path(frames_dir), pseudonym_key(config), labels_file, progress)
    stored = upload.store_cases(config, ingestion, name, listed)  # type: ignore[arg-type]  # the same cases()/result contract
    report = ingestion.result.to_report()
    report.update(labels_file=None if labels_file is None else str(labels_file), label_rows=len(ingestion.rows))
    return upload.publish_stored(config, stored, name, domain, report)


def _entry(path: str | Path, reason: str, files: list[Path]) -> dict[str, Any]:
    return {"path": str(path), "reason": reason, "files": [str(f) for f in files]}


def _normalised_name(text: str) -> str:
    """A labels row's `file` as a POSIX path relative to the frames folder."""
    name = text.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _unique_names(files: list[Path], root: Path) -> dict[str, str]:
    """File name -> relative path, for names that occur once: a row may name a frame by its file name alone."""
    by_name: dict[str, list[str]] = {}
    for path in files:
        by_name.setdefault(path.name, []).append(path.relative_to(root).as_posix())
    return {name: paths[0] for name, paths in by_name.items() if len(paths) == 1}


def _frame_kind(path: Path) -> tuple[str, Dataset | str | None]:
    """("png", None), ("dicom", its header) for a DICOM depth frame, ("ignored", why) for a file
    that is no depth frame, or ("rejected", why) for a damaged one: a .dcm file that is not
    readable DICOM, or a DICOM file pydicom cannot parse."""
    if path.suffix.lower() == ".png":
        return "png", None
    try:
        ds = read_dicom(path)
    except InvalidDicomError:
        if path.suffix.lower() == ".dcm":
            return "rejected", (f"{path.name}: not a DICOM file (no 'DICM' marker and no DICOM data set at its start); "
                                "export the frame again as a DICOM Part 10 file")
        return "ignored", "not a depth frame: neither a PNG nor a DICOM file"
    except Exception as exc:  # pydicom raises many types on damaged files
        return "rejected", (f"{path.name}: an unreadable DICOM file ({type(exc).__name__}: {exc}); export the frame "
                            "again as a DICOM Part 10 file")
    if "PixelData" not in ds:
        return "ignored", f"a DICOM object without pixels (Modality {ds.get('Modality', '?')}), not a depth frame"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if str(ds.get("Modality", "")).upper() != DEPTH_MODALITY and "DEPTH" not in image_type:
        return "ignored", (f"a DICOM image of Modality {ds.get('Modality', '?')}, not a depth frame (Modality "
                           f"{DEPTH_MODALITY} or ImageType with DEPTH); ingest image series without --depth-frames")
    return "dicom", ds


def _identity(frame: DepthFrame, row: LabelRow | None, depth: np.ndarray) -> Dataset:
    """The PatientID, StudyInstanceUID and SeriesInstanceUID the pseudonyms are made from."""
    digest = hashlib.sha256(np.ascontiguousarray(depth).tobytes()).hexdigest()
    identity = Dataset()
    header = frame.header
    identity.PatientID = str(header.get("PatientID") or (row.cells.get("patient_id", "") if row else "")
                             or f"depth-frame-{digest[:32]}")
    identity.StudyInstanceUID = str(header.get("StudyInstanceUID") or "")
    identity.SeriesInstanceUID = str(header.get("SeriesInstanceUID") or f"2.25.{int(digest[:32], 16)}")
    return identity


def _png_spacing(path: Path, text: dict[str, str], info: dict[str, Any]) -> tuple[float, float] | None:
    if text.get(PNG_SPACING_KEY):
        spacing = _positive_pair(text[PNG_SPACING_KEY].split("\\"))
        if spacing is None:
            raise FrameError(f"{path.name}: its {PNG_SPACING_KEY} text chunk {text[PNG_SPACING_KEY]!r} is not "
                             "'along\\across' in positive mm; correct it or give pixel_spacing_mm in its labels row")
        return spacing
    dpi = info.get("dpi")
    if dpi and all(float(v) > 1 for v in dpi):  # pHYs in pixels per metre, as Pillow reports it (dots per inch)
        x_mm, y_mm = (25.4 / float(v) for v in dpi)
        return (y_mm, x_mm)
    return None


def _positive_pair(values: Any) -> tuple[float, float] | None:
    if values is None:
        return None
    numbers = [_number(v) for v in list(values)]
    if len(numbers) != 2 or any(n is None or not np.isfinite(n) or n <= 0 for n in numbers):
        return None
    return (float(numbers[0]), float(numbers[1]))


def _number(value: object) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None

"""The site's case store: every accepted case written once to disk, listed in a versioned manifest,
read back one case at a time.

A site holds hundreds to thousands of cases, far more than fit in memory or should cross a process
boundary per call. So ingestion writes each case once under `data_dir/case_store/` as uncompressed
NIfTI (what the field's tools read, and memory-mappable), and the manifest (`manifest.sqlite`
beside the files) lists the cases with their geometry, metadata, labels, split and content hash.
The syft asset names a published manifest version (`published_manifest` reads its entries at run
time); site tasks read the cases they need through `CaseSource`.

Guarantees:
- a case appears in the manifest only once its files are complete (written to a temporary folder,
  renamed into place, then listed in one transaction), so an interrupted ingestion leaves no
  half-written case and the next ingestion simply resumes;
- putting a case whose id and content are already stored is a no-op (re-ingesting the same
  series); the same id with other content is refused, never silently replaced;
- each ingestion that adds cases starts a new manifest version; a run can name the version it used,
  and older versions stay reproducible (cases are only ever added).

A site may keep several collections (one per syft dataset: the MR study, a phantom set); a case
belongs to a collection's manifest, and its files, named by its case id, are written once however
many collections list it. Version numbers count across the store; a collection's manifest at
version v holds its cases added in versions up to v.

Orientation: records are ITK-style (array [Z, Y, X], LPS patient coordinates); the NIfTI files carry
the equivalent RAS affine so external tools show them correctly, while the manifest's own
spacing/origin/direction are what the site tasks use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from domains.case_manifest import read_manifest
from domains.case_record import check_case_record

STORE_DIR = "case_store"
MANIFEST = "manifest.sqlite"
_CASES = "cases"
_TEMPORARY_PREFIX = ".incomplete-"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

DEFAULT_COLLECTION = "cases"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    collection TEXT NOT NULL,
    created TEXT NOT NULL DEFAULT (datetime('now')),
    note TEXT NOT NULL DEFAULT '',
    published TEXT
);
CREATE TABLE IF NOT EXISTS cases (
    collection TEXT NOT NULL,
    case_id TEXT NOT NULL,
    entry TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    added_in INTEGER NOT NULL REFERENCES versions(version),
    PRIMARY KEY (collection, case_id)
);
"""


class CaseStoreError(ValueError):
    """A case the store cannot take as given; the message names the case and what to do."""


@dataclass(frozen=True)
class ManifestEntry:
    """One case as the manifest lists it: everything about it except its pixels.

    `images` names the extra images stored beside the primary one; `split` is train, validation or
    test (see `case_splits`), and `labelled` is False for a case kept for semi-supervised training.
    `mask_labels` names the mask's label values 1, 2, ... when it is a label map of several
    structures (liver, lesion); empty for a binary mask, whose one label is 1.
    """

    case_id: str
    patient: str
    split: str
    labelled: bool
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    metadata: dict[str, Any]
    labels: dict[str, float] = field(default_factory=dict)
    images: tuple[str, ...] = ()
    has_mask: bool = True
    content_hash: str = ""
    added_in: int = 0
    mask_labels: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values: what the syft asset holds for this case."""
        out = asdict(self)
        for key in ("shape", "spacing", "origin", "direction", "images", "mask_labels"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ManifestEntry:
        return cls(
            case_id=str(data["case_id"]), patient=str(data["patient"]), split=str(data["split"]),
            labelled=bool(data["labelled"]), shape=tuple(int(v) for v in data["shape"]),
            spacing=tuple(float(v) for v in data["spacing"]), origin=tuple(float(v) for v in data["origin"]),
            direction=tuple(float(v) for v in data["direction"]), metadata=dict(data["metadata"]),
            labels={str(k): float(v) for k, v in (data.get("labels") or {}).items()},
            images=tuple(str(v) for v in data.get("images") or ()), has_mask=bool(data.get("has_mask", True)),
            content_hash=str(data.get("content_hash", "")), added_in=int(data.get("added_in", 0)),
            mask_labels=tuple(str(v) for v in data.get("mask_labels") or ()),
        )


def content_hash(record: Mapping[str, Any], mask_labels: Sequence[str] = ()) -> str:
    """SHA-256 over the pixels, masks, labels and grid of a case record: equal for a re-ingested series.

    The names of a label map's values are part of its content (the same voxels read as other
    structures are another case); a binary mask (no names) hashes as it always has.
    """
    digest = hashlib.sha256()
    arrays = [("image", record["image"])]
    if record.get("mask") is not None:
        arrays.append(("mask", record["mask"]))
    arrays += [(f"images/{name}", array) for name, array in sorted((record.get("images") or {}).items())]
    for name, array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    grid = {k: [float(v) for v in record[k]] for k in ("spacing", "origin", "direction")}
    described: dict[str, Any] = {"grid": grid, "labels": record.get("labels") or {}}
    if mask_labels:
        described["mask_labels"] = [str(name) for name in mask_labels]
    digest.update(json.dumps(described, sort_keys=True).encode())
    return digest.hexdigest()


def _affine(spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """4x4 RAS affine of an ITK-style grid: voxel (x, y, z) index -> RAS mm."""
    z, y, x = spacing
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ np.array(direction, dtype=float).reshape(3, 3) @ np.diag([x, y, z])
    affine[:3, 3] = _LPS_TO_RAS @ np.array(origin, dtype=float)
    return affine


def _write_nifti(path: Path, volume: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(volume).transpose(2, 1, 0), affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


# The NIfTI-1 header fields `read_volume` needs (byte offset, numpy type), little-endian as written here.
_NIFTI_FIELDS = {"sizeof_hdr": (0, "<i4"), "dim": (40, "<8i2"), "datatype": (70, "<i2"), "vox_offset": (108, "<f4"),
                 "scl_slope": (112, "<f4"), "scl_inter": (116, "<f4"), "magic": (344, "S4")}
_NIFTI_TYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64}


def read_volume(path: Path) -> np.ndarray:
    """A stored volume as [Z, Y, X], memory-mapped: only the slices a task touches are read.

    The store wrote the file (single-file NIfTI-1, unscaled), so its header is read directly rather
    than through nibabel's general loader, which costs ~0.7 ms per file in checks a site with a
    thousand cases would pay on every call. Anything other than what the store writes is refused.
    """
    with open(path, "rb") as handle:  # one open per volume: a sandboxed run's audit hook checks each
        header = handle.read(352)
        if len(header) < 352:
            raise CaseStoreError(f"{path}: truncated NIfTI file; the case store writes complete files only")
        fields = {name: np.frombuffer(header, dtype=kind, count=1, offset=offset)[0]
                  for name, (offset, kind) in _NIFTI_FIELDS.items()}
        ndim, *dims = (int(v) for v in fields["dim"])
        datatype = int(fields["datatype"])
        if int(fields["sizeof_hdr"]) != 348 or fields["magic"] != b"n+1" or ndim != 3 or datatype not in _NIFTI_TYPES:
            raise CaseStoreError(f"{path}: not a single-file little-endian 3-D NIfTI-1 volume as the case store writes")
        slope, inter = float(fields["scl_slope"]), float(fields["scl_inter"])
        if (np.isfinite(slope) and slope not in (0.0, 1.0)) or (np.isfinite(inter) and inter != 0.0):
            raise CaseStoreError(f"{path}: scaled NIfTI data; the case store writes unscaled volumes only")
        x, y, z = dims[:3]
        offset, dtype = int(fields["vox_offset"]), np.dtype(_NIFTI_TYPES[datatype])
        if offset < 352 or os.fstat(handle.fileno()).st_size != offset + x * y * z * dtype.itemsize:
            raise CaseStoreError(f"{path}: its size does not match its header (a damaged or truncated file)")
        volume = np.memmap(handle, dtype=dtype, mode="r", offset=offset, shape=(x, y, z), order="F")
    return volume.transpose(2, 1, 0)


class CaseStore:
    """The case files and manifest of one site, rooted at `data_dir/case_store`."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / STORE_DIR
        (self.root / _CASES).mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._db() as db:
            db.executescript(_SCHEMA)
        self._remove_incomplete()

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.root / MANIFEST, timeout=60, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def _remove_incomplete(self) -> None:
        """Folders of cases an interrupted ingestion did not finish; they are rewritten on resume."""
        listed = set(self.case_ids())
        for folder in (self.root / _CASES).iterdir():
            if folder.name.startswith(_TEMPORARY_PREFIX) or folder.name not in listed:
                shutil.rmtree(folder, ignore_errors=True)

    def case_dir(self, case_id: str) -> Path:
        return self.root / _CASES / case_id

    def case_ids(self) -> list[str]:
        """Every stored case, whichever collections list it."""
        with self._db() as db:
            return [row[0] for row in db.execute("SELECT DISTINCT case_id FROM cases ORDER BY case_id")]

    @property
    def version(self) -> int:
        """The newest manifest version of the store (0 before the first)."""
        with self._db() as db:
            return int(db.execute("SELECT COALESCE(MAX(version), 0) FROM versions").fetchone()[0])

    def collection_version(self, collection: str = DEFAULT_COLLECTION) -> int:
        """The newest version that added cases to `collection` (0 if it has none)."""
        with self._db() as db:
            row = db.execute("SELECT COALESCE(MAX(added_in), 0) FROM cases WHERE collection = ?", (collection,)).fetchone()
        return int(row[0])

    def manifest(self, version: int | None = None, collection: str = DEFAULT_COLLECTION) -> list[ManifestEntry]:
        """The cases of `collection` at manifest `version` (default: the newest), in case-id order."""
        newest = self.version
        version = newest if version is None else version
        if not 0 <= version <= newest:
            raise CaseStoreError(f"manifest version {version} does not exist; this store has versions 0 to {newest}")
        with self._db() as db:
            rows = db.execute("SELECT entry FROM cases WHERE collection = ? AND added_in <= ? ORDER BY case_id",
                              (collection, version)).fetchall()
        return [ManifestEntry.from_dict(json.loads(row[0])) for row in rows]

    def patient_splits(self) -> dict[str, tuple[str, bool]]:
        """Pseudonymous patient -> (split, labelled) of the cases already stored, in any collection."""
        with self._db() as db:
            rows = db.execute("SELECT entry FROM cases ORDER BY added_in").fetchall()
        out: dict[str, tuple[str, bool]] = {}
        for (text,) in rows:
            entry = json.loads(text)
            out.setdefault(str(entry["patient"]), (str(entry["split"]), bool(entry["labelled"])))
        return out

    def stored_hash(self, case_id: str) -> str | None:
        """The content hash of the case's files, if they are stored (in any collection)."""
        with self._db() as db:
            row = db.execute("SELECT content_hash FROM cases WHERE case_id = ? LIMIT 1", (case_id,)).fetchone()
        return None if row is None else str(row[0])

    def _listed_in(self, collection: str, case_id: str) -> bool:
        with self._db() as db:
            return db.execute("SELECT 1 FROM cases WHERE collection = ? AND case_id = ?", (collection, case_id)).fetchone() is not None

    def _version_collection(self, version: int) -> str:
        with self._db() as db:
            row = db.execute("SELECT collection FROM versions WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise CaseStoreError(f"manifest version {version} does not exist; start one with CaseStore.new_version")
        return str(row[0])

    def put(self, record: Mapping[str, Any], patient: str, split: str, labelled: bool = True,
            version: int | None = None, mask_labels: Sequence[str] = ()) -> ManifestEntry | None:
        """Write one case and list it in manifest `version` (see `new_version`) of that version's collection.

        `mask_labels` names the values 1, 2, ... of a label-map mask (see `ManifestEntry`). Returns
        the entry, or None when the collection already lists the case with the same content.
        """
        check_case_record(record)
        mask_labels = tuple(str(name) for name in mask_labels)
        if mask_labels:
            _check_label_map(record, mask_labels)
        case_id = str(record["case_id"])
        if not case_id or "/" in case_id or case_id.startswith("."):
            raise CaseStoreError(f"case id {case_id!r} cannot name a folder; case ids come from de-identification")
        version = self.version if version is None else version
        if version < 1:
            raise CaseStoreError("start a manifest version (CaseStore.new_version) before adding cases")
        collection = self._version_collection(version)
        digest = content_hash(record, mask_labels)
        existing = self.stored_hash(case_id)
        if existing is not None and existing != digest:
            raise CaseStoreError(
                f"case {case_id}: already stored with other content (a re-export of the same series with changed "
                "pixels, mask or labels); stored cases are never replaced - remove the site's case from the store "
                "deliberately, or ingest the new export under a new series")
        if existing is not None and self._listed_in(collection, case_id):
            return None
        image = np.asarray(record["image"])
        entry = ManifestEntry(
            case_id=case_id, patient=patient, split=split, labelled=labelled, shape=tuple(int(n) for n in image.shape),
            spacing=tuple(float(v) for v in record["spacing"]), origin=tuple(float(v) for v in record["origin"]),
            direction=tuple(float(v) for v in record["direction"]), metadata=dict(record["metadata"]),
            labels={str(k): float(v) for k, v in (record.get("labels") or {}).items()},
            images=tuple(sorted(record.get("images") or {})), has_mask=record.get("mask") is not None,
            content_hash=digest, added_in=version, mask_labels=mask_labels,
        )
        if existing is None:
            self._write_files(record, entry)
        with self._db() as db:
            db.execute("INSERT INTO cases (collection, case_id, entry, content_hash, added_in) VALUES (?, ?, ?, ?, ?)",
                       (collection, case_id, json.dumps(entry.to_dict(), sort_keys=True), digest, version))
        return entry

    def _write_files(self, record: Mapping[str, Any], entry: ManifestEntry) -> None:
        """The case's NIfTI files, complete under their final name or not at all."""
        case_id = entry.case_id
        image = np.asarray(record["image"])
        affine = _affine(entry.spacing, entry.origin, entry.direction)
        staging = self.root / _CASES / f"{_TEMPORARY_PREFIX}{case_id}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(mode=0o700)
        try:
            _write_nifti(staging / "image.nii", image.astype(np.float32, copy=False), affine)
            if entry.has_mask:
                _write_nifti(staging / "mask.nii", np.asarray(record["mask"]).astype(np.uint8, copy=False), affine)
            for name in entry.images:
                _write_nifti(staging / f"image-{name}.nii", np.asarray(record["images"][name], dtype=np.float32), affine)
            target = self.case_dir(case_id)
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def new_version(self, note: str = "", collection: str = DEFAULT_COLLECTION) -> int:
        """Start the manifest version of `collection` that the next cases are added to."""
        with self._db() as db:
            cursor = db.execute("INSERT INTO versions (collection, note) VALUES (?, ?)", (collection, note))
            return int(cursor.lastrowid)

    def unpublished_version(self, collection: str = DEFAULT_COLLECTION) -> int | None:
        """The newest version of `collection` not yet published as a dataset: an ingestion that
        stopped before it finished, which the next ingestion continues rather than starting anew."""
        with self._db() as db:
            row = db.execute("SELECT MAX(version) FROM versions WHERE collection = ?", (collection,)).fetchone()
            newest = row[0]
            if newest is None:
                return None
            published = db.execute("SELECT published FROM versions WHERE version = ?", (newest,)).fetchone()[0]
        return None if published else int(newest)

    def mark_published(self, version: int, dataset: str) -> None:
        """Record that `version` is what dataset `dataset` serves."""
        with self._db() as db:
            db.execute("UPDATE versions SET published = ? WHERE version = ?", (dataset, version))

    def published(self, collection: str = DEFAULT_COLLECTION) -> list[tuple[int, str]]:
        """(version, dataset name) of every published version of `collection`, oldest first."""
        with self._db() as db:
            rows = db.execute("SELECT version, published FROM versions WHERE collection = ? AND published IS NOT NULL "
                              "ORDER BY version", (collection,)).fetchall()
        return [(int(v), str(name)) for v, name in rows]

    def drop_empty_version(self, version: int) -> None:
        """Forget a version to which no case was added (an ingestion that found nothing new)."""
        with self._db() as db:
            db.execute("DELETE FROM versions WHERE version = ? AND NOT EXISTS "
                       "(SELECT 1 FROM cases WHERE added_in = ?)", (version, version))


def _check_label_map(record: Mapping[str, Any], mask_labels: tuple[str, ...]) -> None:
    """A label map's values must each have a name, or the manifest would misdescribe the mask."""
    mask = record.get("mask")
    if mask is None:
        raise CaseStoreError(f"case {record['case_id']}: mask label names {list(mask_labels)} given for a case "
                             "without a mask")
    highest = int(np.max(mask)) if np.size(mask) else 0
    if highest > len(mask_labels):
        raise CaseStoreError(f"case {record['case_id']}: its mask has label value {highest}, but only "
                             f"{len(mask_labels)} label name(s) were given ({', '.join(mask_labels)})")


def published_manifest(store_root: Path, collection: str, version: int) -> list[ManifestEntry]:
    """The entries of published manifest `version` of `collection`, read without changing anything.

    This is how the server turns a dataset's asset (which names a collection and version) into the
    cases of a run: read-only, so a run never touches the store an ingestion may be writing to, and
    only a version that was published as that collection's dataset is served.
    """
    path = Path(store_root) / MANIFEST
    if not path.is_file():
        raise CaseStoreError(f"{path}: no case store manifest at this site; ingest cases before publishing them")
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=60)
    try:
        row = db.execute("SELECT published FROM versions WHERE version = ? AND collection = ?",
                         (int(version), collection)).fetchone()
        if row is None or row[0] is None:
            raise CaseStoreError(f"manifest version {version} of collection '{collection}' was never published at this site")
        rows = db.execute("SELECT entry FROM cases WHERE collection = ? AND added_in <= ? ORDER BY case_id",
                          (collection, int(version))).fetchall()
    finally:
        db.close()
    return [ManifestEntry.from_dict(json.loads(text)) for (text,) in rows]


def cases_of_manifest(store_root: Path, value: str) -> tuple[CaseSource, int]:
    """The cases a manifest asset names at this site, and its version: the published version's
    entries for the private asset (a reference), a document's own entries otherwise."""
    document = read_manifest(value)
    entries = document.get("cases")
    if entries is None:
        entries = published_manifest(store_root, document["collection"], document["version"])
    return CaseSource(store_root, entries), int(document["version"])


class CaseSource(Sequence[dict[str, Any]]):
    """The cases of a manifest as a read-only sequence of case records, each loaded when asked for.

    This is what a site task receives: `len(cases)`, `cases[i]` and `for case in cases` work as on
    a list, while memory holds only the case being used (volumes are memory-mapped). Only the
    files under the store's root are read.
    """

    def __init__(self, store_root: Path, entries: Sequence[Mapping[str, Any]]) -> None:
        self.store_root = Path(store_root)
        self.entries = [e if isinstance(e, ManifestEntry) else ManifestEntry.from_dict(e) for e in entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if isinstance(index, slice):
            return CaseSource(self.store_root, self.entries[index])  # type: ignore[return-value]
        entry = self.entries[index]
        folder = self.store_root / _CASES / entry.case_id
        record: dict[str, Any] = {
            "case_id": entry.case_id,
            "image": read_volume(folder / "image.nii"),
            "spacing": list(entry.spacing),
            "origin": list(entry.origin),
            "direction": list(entry.direction),
            "metadata": dict(entry.metadata),
            "split": entry.split,
        }
        if entry.has_mask:
            record["mask"] = read_volume(folder / "mask.nii")
        if entry.images:
            record["images"] = {name: read_volume(folder / f"image-{name}.nii") for name in entry.images}
        if entry.labels:
            record["labels"] = dict(entry.labels)
        return record

    def in_split(self, split: str) -> CaseSource:
        """Only the cases of one split (train, validation, test or unlabelled)."""
        if split == "unlabelled":
            return CaseSource(self.store_root, [e for e in self.entries if not e.labelled])
        return CaseSource(self.store_root, [e for e in self.entries if e.split == split and e.labelled])

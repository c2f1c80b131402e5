"""Put ingested cases on the datasite: into the case store one by one, then one dataset whose asset
is the manifest.

Cases stream from `ingest.Ingestion` into the site's case store (`case_store`), each written once
and listed in the manifest of the dataset's collection only when complete; memory holds one series
at a time. The syft dataset's private asset is the manifest (one entry per case: geometry,
metadata, labels, split, content hash; no pixel) as one JSON document (`domains.case_manifest`),
and its mock is the mock manifest of the same shape, whose cases the dataset's domain renders as
synthetic images (`Domain.mock_cases`). An approved run receives the manifest and reads the cases it needs
from the store (`site_execution`).

Ingesting again is safe and incremental:
- an ingestion stopped half-way (killed, a full disk) left only complete cases in an unpublished
  manifest version; the next ingestion continues that version, skips the cases already stored
  and publishes it;
- re-ingesting the same series is a no-op (content hash), and the dataset stays as it was;
- a later ingestion with new series adds them in a new manifest version and publishes it under the
  same dataset name. The previous dataset is retired (soft-deleted with its asset kept), so the
  requests approved against it keep running on the manifest version they were approved with,
  while new requests see the new one. Each dataset's description names its manifest version.

Splits are fixed per patient at ingestion (`case_splits`, `[cases] split_fractions`) and never
change as the site grows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasite_setup.case_splits import UNLABELLED, assign_split, read_split_file
from datasite_setup.case_store import CaseStore, ManifestEntry
from datasite_setup.connection import admin_client
from datasite_setup.credentials import pseudonym_key
from datasite_setup.deidentify import pseudonym_of_patient_id
from datasite_setup.ingest import Ingestion, PrimarySeries
from datasite_setup.site_config import SiteConfig
from domains import DOMAINS
from domains.case_manifest import manifest_document, manifest_reference, mock_manifest

ASSET_NAME = "cases"

DEFAULT_DOMAIN = "brain_mr_segmentation"


def default_dataset_name(config: SiteConfig) -> str:
    return f"{config.name}-cases"


def describe(config: SiteConfig, entries: list[ManifestEntry], version: int) -> str:
    """The dataset's description: what a data scientist may know about the collection."""
    vendors = sorted({str(e.metadata.get("Manufacturer", "?")) for e in entries})
    splits = {name: sum(e.split == name and e.labelled for e in entries) for name in ("train", "validation", "test")}
    return (
        f"{len(entries)} de-identified cases at {config.name} (manifest version {version}); scanners: "
        f"{', '.join(vendors)}; splits: " + ", ".join(f"{n} {c}" for n, c in splits.items()) + ". "
        "The asset is the site's manifest: one entry per case (case_id, split, shape [Z,Y,X], spacing [z,y,x] mm, "
        "origin, direction, acquisition metadata, label names, mask_labels: the structure of each mask value 1, "
        "2, ... when masks are label maps); approved site tasks read the images (float32) and masks (uint8) at "
        "the site."
    )


@dataclass
class StoredCases:
    """What one ingestion did to the case store."""

    store: CaseStore
    version: int
    added: int = 0
    split_conflicts: list[str] = field(default_factory=list)  # patients whose listed split differs from their stored one


def store_cases(config: SiteConfig, ingestion: Ingestion, collection: str,
                listed_splits: dict[str, str] | None = None) -> StoredCases:
    """Write every accepted case of `ingestion` to the site's case store.

    A patient's split is the one stored with their earlier cases, else the one `listed_splits`
    (PatientID -> split, from the site's split file) gives, else the keyed hash. The version is the
    collection's unpublished one if an earlier ingestion stopped before publishing.
    """
    store = CaseStore(config.data_dir)
    key = pseudonym_key(config)
    listed = {pseudonym_of_patient_id(pid, key): split for pid, split in (listed_splits or {}).items()}
    known = store.patient_splits()
    version = store.unpublished_version(collection) or store.new_version(note="ingestion", collection=collection)
    outcome = StoredCases(store, version)
    for case in ingestion.cases():  # its progress bar (files read, with an ETA) covers the writes too
        wanted = listed.get(case.patient)
        if case.patient in known:
            split, labelled = known[case.patient]
            if wanted is not None and wanted != (split if labelled else UNLABELLED):
                outcome.split_conflicts.append(case.patient)
        elif wanted is not None:
            split, labelled = ("train", False) if wanted == UNLABELLED else (wanted, True)
        else:
            split, labelled = assign_split(case.patient, key, config.split_fractions), True
        known[case.patient] = (split, labelled)
        outcome.added += store.put(case.record, case.patient, split, labelled, version=version,
                                   mask_labels=case.mask_labels) is not None
    return outcome


def publish(config: SiteConfig, store: CaseStore, version: int, name: str, domain: str) -> None:
    """Upload manifest `version` of collection `name` as dataset `name`, retiring an older one."""
    import syft as sy

    from domains import get_domain

    entries = store.manifest(version, collection=name)
    manifest = [entry.to_dict() for entry in entries]
    mock = mock_manifest(manifest)
    get_domain(domain).mock_cases(mock[:1])  # the domain can render the mock's cases: fail before uploading
    admin = admin_client(config)
    for old in admin.datasets.get_all():
        if old.name == name:
            outcome = admin.api.services.dataset.delete(uid=old.id, delete_assets=False)
            if isinstance(outcome, sy.SyftError):
                raise RuntimeError(f"could not retire dataset '{name}' version on {config.name}: {outcome.message}")
    dataset = sy.Dataset(name=name, description=describe(config, entries, version))
    dataset.add_asset(sy.Asset(name=ASSET_NAME, data=manifest_reference(name, version),
                               mock=manifest_document(mock, name, version)))
    outcome = admin.upload_dataset(dataset)
    if isinstance(outcome, sy.SyftError):
        raise RuntimeError(f"upload of dataset '{name}' to {config.name} failed: {outcome.message}; its cases are "
                           "stored: run the same ingestion again to publish them")
    store.mark_published(version, name)


def ingest_to_datasite(
    config: SiteConfig,
    dicom_dir: Path,
    masks_dir: Path | None = None,
    roi: str | None = None,
    dataset_name: str | None = None,
    domain: str = DEFAULT_DOMAIN,
    progress: bool = True,
    primary_modality: str | PrimarySeries | None = None,
    split_file: Path | None = None,
    structures: Sequence[str] = (),
) -> dict[str, Any]:
    """Read, de-identify, store and publish; return the report of every file (JSON-serialisable).

    `domain` names the learning task the cases serve; its mock-case generator renders the mock's cases.
    With `primary_modality` (a modality, or a `PrimarySeries` that may also name the primary series'
    SeriesDescription, e.g. T1), the other series in a primary series' frame of reference join its
    case as further images (`ingest`). `split_file` (CSV: PatientID,split) fixes the split of the
    patients it lists (`case_splits`). With `structures` (liver, lesion) masks are label maps of
    those structures, in order, and the report lists them as `mask_labels`. The report says how many
    cases this run added, which manifest version the dataset serves, and which patients kept a
    stored split the file contradicts.
    """
    if not dicom_dir.is_dir():
        raise ValueError(f"{dicom_dir}: not a folder; give the folder that holds the DICOM series")
    if masks_dir is not None and not masks_dir.is_dir():
        raise ValueError(f"{masks_dir}: --masks is not a folder")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r} for the mock cases; known domains: {', '.join(DOMAINS)}")
    name = dataset_name or default_dataset_name(config)
    listed = read_split_file(split_file) if split_file is not None else None
    ingestion = Ingestion(dicom_dir, masks_dir, pseudonym_key(config), roi=roi, progress=progress,
                          primary_modality=primary_modality, structures=structures)
    stored = store_cases(config, ingestion, name, listed)
    report = ingestion.result.to_report()
    if ingestion.structures:
        report["mask_labels"] = list(ingestion.structures)
    return publish_stored(config, stored, name, domain, report)


def publish_stored(config: SiteConfig, stored: Any, name: str, domain: str, report: dict[str, Any]) -> dict[str, Any]:
    """After `store_cases`: drop a version that added nothing, publish the new one if it has cases,
    and complete the ingestion `report` with what was added and which manifest the dataset serves."""
    store = stored.store
    report.update(dataset=None, added=stored.added, manifest_version=None, split_conflicts=stored.split_conflicts)
    if not stored.added:
        store.drop_empty_version(stored.version)
    if store.unpublished_version(name) is not None and store.manifest(collection=name):
        publish(config, store, store.unpublished_version(name), name, domain)
    published = store.published(name)
    if published:
        report["manifest_version"], report["dataset"] = published[-1]
    return report

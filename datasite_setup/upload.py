"""Put ingested cases on the datasite: one dataset with a private asset and its mock.

Everything is read, de-identified and checked before the first byte is sent, and the dataset is
uploaded in one call, so a failure leaves the datasite as it was. The mock holds synthetic cases
with the same shapes, spacing and metadata keys as the private ones, and no real pixel, made by
the mock-case generator of the domain the dataset serves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasite_setup.connection import admin_client
from datasite_setup.credentials import pseudonym_key
from datasite_setup.ingest import read_cases
from datasite_setup.site_config import SiteConfig
from domains import DOMAINS

ASSET_NAME = "cases"

DEFAULT_DOMAIN = "brain_mr_segmentation"


def default_dataset_name(config: SiteConfig) -> str:
    return f"{config.name}-cases"


def _describe(config: SiteConfig, cases: list[dict[str, Any]]) -> str:
    vendors = sorted({str(c["metadata"].get("Manufacturer", "?")) for c in cases})
    return (
        f"{len(cases)} de-identified cases (image + segmentation mask) at {config.name}; "
        f"scanners: {', '.join(vendors)}. Each case: case_id, image float32 [Z,Y,X], mask uint8 [Z,Y,X], "
        "spacing [z,y,x] mm, origin, direction, acquisition metadata."
    )


def ingest_to_datasite(
    config: SiteConfig,
    dicom_dir: Path,
    masks_dir: Path | None = None,
    roi: str | None = None,
    dataset_name: str | None = None,
    domain: str = DEFAULT_DOMAIN,
) -> dict[str, Any]:
    """Read, de-identify and upload; return the accepted/rejected report (JSON-serialisable).

    `domain` names the learning task the cases serve; its mock-case generator makes the mock asset.
    """
    import syft as sy

    from domains import get_domain

    if not dicom_dir.is_dir():
        raise ValueError(f"{dicom_dir}: not a folder; give the folder that holds the DICOM series")
    if masks_dir is not None and not masks_dir.is_dir():
        raise ValueError(f"{masks_dir}: --masks is not a folder")
    name = dataset_name or default_dataset_name(config)
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r} for the mock cases; known domains: {', '.join(DOMAINS)}")
    result = read_cases(dicom_dir, masks_dir, pseudonym_key(config), roi=roi)
    report = result.to_report()
    report["dataset"] = None
    if not result.cases:
        return report

    admin = admin_client(config)
    if any(ds.name == name for ds in admin.datasets.get_all()):
        raise ValueError(
            f"dataset '{name}' already exists on {config.name}; ingest under another --dataset name "
            "(nothing was uploaded)"
        )
    dataset = sy.Dataset(name=name, description=_describe(config, result.cases))
    dataset.add_asset(sy.Asset(name=ASSET_NAME, data=result.cases, mock=get_domain(domain).mock_cases(result.cases)))
    outcome = admin.upload_dataset(dataset)
    if isinstance(outcome, sy.SyftError):
        raise RuntimeError(f"upload of dataset '{name}' to {config.name} failed: {outcome.message}")
    report["dataset"] = name
    return report

"""The case manifest as a syft asset: a JSON document naming a collection's manifest version.

A site's dataset publishes its manifest (what `datasite_setup.case_store` lists: per case its id,
split, shape, grid, acquisition metadata, label names, content hash) rather than its images; an
approved run reads the images at the site.

The private asset is `manifest_reference`: the collection and manifest version only. The entries
stay in the site's own database, where the site reads them when a run starts. Nothing on syft's
side then grows with the site: syft 0.9.5 loads an asset several times per call and walks every
element of a loaded value (a 1,000-entry list of dicts was tens of thousands of syft objects per
load; a 256-entry document as one string was still ~0.05 s per walk, one step per character).

The mock asset is a full document over mock entries (`manifest_document` of `mock_manifest`):
same shapes, spacing, splits and metadata keys, no patient value. `read_manifest(asset.mock)`
gives the data scientist the entries, and a domain's `mock_cases` renders synthetic images for them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from domains.case_record import MOCK_CASE_PREFIX, mock_case_id, mock_metadata

FORMAT = "medfed-case-manifest/1"
_PREFIX = '{"format": "' + FORMAT + '"'


class ManifestFormatError(ValueError):
    """A value that is not a case manifest document; the message says what was expected."""


def manifest_document(entries: Sequence[Mapping[str, Any]], collection: str, version: int) -> str:
    """The JSON document of manifest `version` of `collection` (entries as plain dicts)."""
    body = {"collection": collection, "version": int(version), "cases": [dict(e) for e in entries]}
    return _PREFIX + ", " + json.dumps(body, sort_keys=True)[1:]


def manifest_reference(collection: str, version: int) -> str:
    """The private asset's document: manifest `version` of `collection`, its entries held by the site."""
    return _PREFIX + ", " + json.dumps({"collection": collection, "version": int(version)}, sort_keys=True)[1:]


def is_manifest(value: Any) -> bool:
    """Whether `value` is a case manifest document (checked by its leading format tag only)."""
    return isinstance(value, str) and value.startswith(_PREFIX)


def read_manifest(value: Any) -> dict[str, Any]:
    """`{"format", "collection", "version"}` of a manifest document, and `"cases"` when it lists
    its entries (a mock; the private asset is a reference whose entries the site holds)."""
    if not is_manifest(value):
        raise ManifestFormatError(f"not a case manifest: expected a JSON string starting with {_PREFIX!r}, "
                                  f"got {type(value).__name__}")
    document = json.loads(value)
    if not isinstance(document.get("collection"), str) or not isinstance(document.get("version"), int):
        raise ManifestFormatError("case manifest without its 'collection' name and integer 'version'")
    if "cases" in document and not isinstance(document["cases"], list):
        raise ManifestFormatError("case manifest whose 'cases' is not a list")
    return document


def mock_manifest(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mock entries for a site's manifest: one per case with its shape, grid, split, metadata schema
    and mask label names (what the mask's values mean, as the ingestion named them, not what a case
    holds), and no patient value (ids, pseudonyms, hashes and labels replaced)."""
    mocks = []
    for index, entry in enumerate(entries):
        mock = {key: entry[key] for key in ("split", "labelled", "shape", "spacing", "origin", "direction",
                                            "images", "has_mask", "mask_labels") if key in entry}
        mock.update(case_id=mock_case_id(index), patient=f"{MOCK_CASE_PREFIX}patient-{index:04d}",
                    metadata=mock_metadata(entry.get("metadata") or {}), content_hash="", added_in=0,
                    labels={name: float("nan") for name in entry.get("labels") or {}})
        mocks.append(mock)
    return mocks

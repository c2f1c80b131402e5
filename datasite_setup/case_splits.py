"""Fixed train / validation / test splits, decided once per patient and never again.

Every case gets its split from a keyed hash (HMAC-SHA256 with the site's own key) of its
pseudonymous patient id: the same patient always lands in the same split, so no patient is in two
splits (a study with T1 and T2, or MR and CT, stays together), and adding cases later never moves an
old one. The key is secret to the site, so a data scientist cannot choose which cases are test cases.

A collection that comes with an official split (a challenge's train/test lists) keeps it: the site
passes a split file at ingestion (`read_split_file`), and its patients take the listed split while
any other patient is hashed as above. A patient already stored keeps the split it has.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}
UNLABELLED = "unlabelled"


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """The fractions as a dict over SPLITS, or a ValueError saying what a valid set is."""
    if set(fractions) != set(SPLITS):
        raise ValueError(f"split fractions must name exactly {', '.join(SPLITS)}, got {', '.join(sorted(fractions)) or 'none'}")
    values = {name: float(fractions[name]) for name in SPLITS}
    if any(v < 0 for v in values.values()) or abs(sum(values.values()) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be >= 0 and add up to 1, got {values}")
    return values


def assign_split(patient: str, key: bytes, fractions: Mapping[str, float] = DEFAULT_FRACTIONS) -> str:
    """The split of every case of `patient` (a pseudonymous id) at a site holding `key`."""
    values = check_fractions(fractions)
    digest = hmac.new(key, b"split\x00" + patient.encode("utf-8"), hashlib.sha256).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for name in SPLITS:
        cumulative += values[name]
        if position < cumulative:
            return name
    return SPLITS[-1]


def read_split_file(path: Path) -> dict[str, str]:
    """PatientID -> split from a CSV file with the header `PatientID,split` (the file stays at the site)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such split file; give a CSV with the columns PatientID,split")
    splits: dict[str, str] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"PatientID", "split"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: the first line must name the columns PatientID,split, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            patient, split = (row["PatientID"] or "").strip(), (row["split"] or "").strip()
            if not patient:
                raise ValueError(f"{path}, line {line}: empty PatientID")
            if split not in (*SPLITS, UNLABELLED):
                raise ValueError(f"{path}, line {line}: split {split!r} for {patient}; use one of {', '.join((*SPLITS, UNLABELLED))}")
            if splits.get(patient, split) != split:
                raise ValueError(f"{path}, line {line}: {patient} is listed in two splits ({splits[patient]} and {split})")
            splits[patient] = split
    return splits

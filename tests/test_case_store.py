"""The site's case store: exact round trips, files external tools read correctly, versions, resumption, splits."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from datasite_setup.case_splits import DEFAULT_FRACTIONS, SPLITS, assign_split, check_fractions
from datasite_setup.case_store import CaseSource, CaseStore, CaseStoreError, content_hash
from domains.case_record import make_case_record

KEY = b"k" * 32
OBLIQUE = (0.0, 0.6, 0.8, 1.0, 0.0, 0.0, 0.0, 0.8, -0.6)


def record(case_id: str, seed: int, labels: dict[str, float] | None = None, with_t2: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 20, size=(5, 12, 10)).astype(np.float32)
    mask = (rng.random((5, 12, 10)) > 0.8).astype(np.uint8)
    images = {"t2": (image * 2).astype(np.float32)} if with_t2 else None
    return make_case_record(case_id, image, mask, (3.0, 0.9, 1.1), (-12.5, 40.0, 7.25), OBLIQUE,
                            {"Manufacturer": "ACME"}, images=images, labels=labels)


def test_round_trip_is_exact_and_itk_reads_the_same_grid(tmp_path) -> None:
    store = CaseStore(tmp_path)
    version = store.new_version("first")
    original = record("case-a", 0, labels={"PatientWeight": 71.5}, with_t2=True)
    entry = store.put(original, patient="patient-1", split="train", version=version)
    assert entry is not None and entry.images == ("t2",) and entry.added_in == version == 1
    loaded = CaseSource(store.root, [e.to_dict() for e in store.manifest()])[0]
    for key in ("image", "mask"):
        np.testing.assert_array_equal(loaded[key], original[key])
        assert loaded[key].dtype == original[key].dtype
    np.testing.assert_array_equal(loaded["images"]["t2"], original["images"]["t2"])
    assert loaded["labels"] == {"PatientWeight": 71.5} and loaded["split"] == "train"
    assert [loaded[k] for k in ("spacing", "origin", "direction")] == [original[k] for k in ("spacing", "origin", "direction")]

    itk = sitk.ReadImage(str(store.case_dir("case-a") / "image.nii"))
    np.testing.assert_allclose(itk.GetSpacing(), original["spacing"][::-1], atol=1e-5)
    np.testing.assert_allclose(itk.GetOrigin(), original["origin"], atol=1e-4)
    np.testing.assert_allclose(itk.GetDirection(), original["direction"], atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk), original["image"])


def test_reingesting_is_a_no_op_other_content_is_refused_and_versions_grow(tmp_path) -> None:
    store = CaseStore(tmp_path)
    v1 = store.new_version()
    store.put(record("case-a", 0), "p1", "train", version=v1)
    store.put(record("case-b", 1), "p2", "test", version=v1)
    v2 = store.new_version()
    assert store.put(record("case-a", 0), "p1", "train", version=v2) is None
    with pytest.raises(CaseStoreError, match="case-a: already stored with other content"):
        store.put(record("case-a", 5), "p1", "train", version=v2)
    store.put(record("case-c", 2), "p3", "validation", version=v2)
    assert [e.case_id for e in store.manifest(v1)] == ["case-a", "case-b"]
    assert [e.case_id for e in store.manifest()] == ["case-a", "case-b", "case-c"]
    assert {e.case_id: e.added_in for e in store.manifest()} == {"case-a": 1, "case-b": 1, "case-c": 2}
    with pytest.raises(CaseStoreError, match="version 9 does not exist"):
        store.manifest(9)
    empty = store.new_version()
    store.drop_empty_version(empty)
    assert store.version == v2


def test_an_interrupted_write_leaves_nothing_and_the_next_open_cleans_up(tmp_path, monkeypatch) -> None:
    store = CaseStore(tmp_path)
    version = store.new_version()
    import datasite_setup.case_store as case_store

    real_write = case_store._write_nifti

    def failing(path, volume, affine):
        if path.name == "mask.nii":
            raise OSError("disk full")
        real_write(path, volume, affine)

    monkeypatch.setattr(case_store, "_write_nifti", failing)
    with pytest.raises(OSError, match="disk full"):
        store.put(record("case-a", 0), "p1", "train", version=version)
    monkeypatch.setattr(case_store, "_write_nifti", real_write)
    assert store.case_ids() == [] and list((store.root / "cases").iterdir()) == []
    (store.root / "cases" / "case-z").mkdir()  # files renamed into place but never listed
    reopened = CaseStore(tmp_path)
    assert list((reopened.root / "cases").iterdir()) == []
    assert reopened.put(record("case-a", 0), "p1", "train", version=version) is not None
    assert reopened.case_ids() == ["case-a"]


def test_content_hash_sees_pixels_masks_labels_and_grid() -> None:
    base = record("case-a", 0)
    assert content_hash(base) == content_hash(record("case-a", 0))
    changed = {**base, "mask": base["mask"].copy()}
    changed["mask"][0, 0, 0] ^= 1
    assert content_hash(changed) != content_hash(base)
    assert content_hash({**base, "labels": {"PatientWeight": 1.0}}) != content_hash(base)
    assert content_hash({**base, "spacing": [3.0, 0.9, 1.2]}) != content_hash(base)


def test_splits_are_keyed_per_patient_stable_and_near_their_fractions() -> None:
    patients = [f"patient-{i}" for i in range(4000)]
    splits = [assign_split(p, KEY) for p in patients]
    assert splits == [assign_split(p, KEY) for p in patients]
    shares = {name: splits.count(name) / len(splits) for name in SPLITS}
    for name, fraction in DEFAULT_FRACTIONS.items():
        assert abs(shares[name] - fraction) < 0.03, shares
    other_key = [assign_split(p, b"x" * 32) for p in patients]
    assert sum(a != b for a, b in zip(splits, other_key)) > 1000  # the key decides, not the id alone
    with pytest.raises(ValueError, match="add up to 1"):
        check_fractions({"train": 0.8, "validation": 0.1, "test": 0.2})
    with pytest.raises(ValueError, match="must name exactly"):
        check_fractions({"train": 1.0})


def test_case_source_is_lazy_and_filters_splits(tmp_path) -> None:
    store = CaseStore(tmp_path)
    version = store.new_version()
    for i, split in enumerate(("train", "train", "test")):
        store.put(record(f"case-{i}", i), f"p{i}", split, version=version)
    source = CaseSource(store.root, [e.to_dict() for e in store.manifest()])
    assert len(source) == 3 and [c["case_id"] for c in source] == ["case-0", "case-1", "case-2"]
    assert isinstance(source[0]["image"], np.memmap) or isinstance(source[0]["image"].base, np.memmap)
    assert [c["case_id"] for c in source.in_split("train")] == ["case-0", "case-1"]
    assert [c["case_id"] for c in source.in_split("test")] == ["case-2"]


def test_a_damaged_case_file_is_refused_when_read_not_misread(tmp_path) -> None:
    store = CaseStore(tmp_path)
    version = store.new_version()
    store.put(record("case-a", 0), "p1", "train", version=version)
    source = CaseSource(store.root, [e.to_dict() for e in store.manifest()])
    image = store.case_dir("case-a") / "image.nii"
    image.write_bytes(image.read_bytes()[:-4])
    with pytest.raises(CaseStoreError, match="image.nii: its size does not match its header"):
        source[0]
    image.write_bytes(b"\x00" * 400)
    with pytest.raises(CaseStoreError, match="not a single-file little-endian 3-D NIfTI-1 volume"):
        source[0]

"""Multi-image cases: the same patient's real CT joins the case of their real MR, on the MR's grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datasite_setup.dicom_series import Geometry
from datasite_setup.ingest import read_cases
from datasite_setup.series_alignment import resample_onto
from tests.conftest import ibsi_dir, shared_data_dir

SECRET = b"test-secret-of-at-least-16-bytes"
PATIENTS = ("STS_001", "STS_002")


@pytest.fixture(scope="module")
def mr_and_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export holding both modalities of two patients (linked, not copied)."""
    ct = shared_data_dir() / "ibsi_sts_ct"
    if not (ct / "dicom").is_dir():
        pytest.skip(f"real CT data not found at {ct} (set MEDFED_TEST_DATA to the folder holding ibsi_sts_ct)")
    root = tmp_path_factory.mktemp("mr-ct")
    for patient in PATIENTS:
        (root / "mr").mkdir(exist_ok=True)
        (root / "ct").mkdir(exist_ok=True)
        (root / "mr" / patient).symlink_to(ibsi_dir() / "dicom" / patient)
        (root / "ct" / patient).symlink_to(ct / "dicom" / patient)
    return root


def test_the_ct_joins_the_mr_case_on_the_mr_grid(mr_and_ct: Path) -> None:
    result = read_cases(mr_and_ct, None, SECRET, progress=False, primary_modality="MR")
    assert result.rejected == [] and len(result.cases) == 2
    for case, accepted in zip(result.cases, result.accepted):
        assert set(case["images"]) == {"CT"}
        ct = case["images"]["CT"]
        assert ct.shape == case["image"].shape == case["mask"].shape
        assert case["metadata"]["Modality"] == "MR"
        tumour = ct[case["mask"] > 0]
        assert -100.0 < float(tumour.mean()) < 150.0  # soft-tissue sarcoma in Hounsfield units, not air or bone
        assert float(ct.max()) > 300.0  # the leg's bone is inside the MR's field of view
        assert any("/ct/" in path for path in accepted["files"]) and "CT" in accepted["images"]
    summary = result.summary()
    assert summary["files"] == summary["accepted"] + summary["ignored"]
    reasons = [item["reason"] for item in result.ignored]
    assert len(reasons) == 2 and all("joined the case" in reason for reason in reasons)  # the CTs' own contours


def test_without_a_primary_modality_each_series_is_its_own_case(mr_and_ct: Path) -> None:
    result = read_cases(mr_and_ct, None, SECRET, progress=False)
    assert len(result.cases) == 4 and all("images" not in case for case in result.cases)
    assert sorted(case["metadata"]["Modality"] for case in result.cases) == ["CT", "CT", "MR", "MR"]


def test_resampling_by_patient_coordinates_moves_voxels_by_the_grid_offset() -> None:
    volume = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    grid = Geometry(shape=(4, 6, 8), spacing=(3.0, 2.0, 1.5), origin=(10.0, -5.0, 7.0), direction=tuple(np.eye(3).ravel()))
    shifted = Geometry(shape=(4, 6, 8), spacing=grid.spacing, origin=(10.0 + 2 * 1.5, -5.0 + 2.0, 7.0), direction=grid.direction)
    out = resample_onto(volume, grid, shifted)
    np.testing.assert_allclose(out[:, :-1, :-2], volume[:, 1:, 2:], atol=1e-4)
    assert np.all(out[:, -1, :] == volume.min())  # outside the source's field of view
    assert resample_onto(volume, grid, grid) is not None and np.array_equal(resample_onto(volume, grid, grid), volume)

"""Generated multi-scanner phantom exports read back through the hospital's ingestion path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datasite_setup.ingest import read_cases
from domains.brain_mr_segmentation.phantom import generate_case
from domains.brain_mr_segmentation.scanner_profiles import PROFILES

SECRET = bytes(range(32))


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("mask_format", ["rtstruct", "nifti"])
def test_phantom_site_ingests_with_masks_and_scanner_metadata(tmp_path: Path, profile: str, mask_format: str) -> None:
    from domains.brain_mr_segmentation.phantom import write_phantom_site

    export = tmp_path / "export"
    write_phantom_site(profile, export, n_cases=2, seed=3, mask_format=mask_format)
    masks_dir = None
    if mask_format == "nifti":
        masks_dir = tmp_path / "masks"
        masks_dir.mkdir()
        for case_dir in sorted(export.iterdir()):
            (case_dir / "mask.nii.gz").rename(masks_dir / f"{case_dir.name}.nii.gz")
    result = read_cases(export, masks_dir, SECRET, progress=False)
    assert result.rejected == []
    assert len(result.cases) == 2

    expected = PROFILES[profile]
    seeds = np.random.SeedSequence(3).spawn(2)
    truth = {int(generate_case(expected, np.random.default_rng(s)).mask.sum()) for s in seeds}
    assert {int(c["mask"].sum()) for c in result.cases} == truth
    for case in result.cases:
        assert case["image"].shape == expected.shape
        assert case["spacing"] == pytest.approx(list(expected.spacing))
        assert case["metadata"]["Manufacturer"] == expected.manufacturer
        assert case["metadata"]["MagneticFieldStrength"] == pytest.approx(expected.field_strength_t)
        assert "PHANTOM" not in repr(case["metadata"])

"""The six real CT studies (IBSI soft-tissue sarcoma, RTSTRUCT) as 3-D cases at a live datasite,
through 3-D U-Net training and sliding-window evaluation: a smoke test of real Hounsfield units and
real geometry, not of accuracy (the contour is a limb tumour, trained as the domain's label 1).

The studies are ingested into the shared site with the liver CT domain (its mock cases); the data
scientist's `local_train` and `evaluate` requests are approved by the admin and run in the site's
sandbox under its memory limit, over all six patients (a smoke test: the shared site may already
hold these patients' MR, whose splits their CT then keeps)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from datasite_setup.ingest import read_cases
from datasite_setup.model_weights import exchanged_weights
from domains import get_domain
from domains.case_manifest import read_manifest
from tests.conftest import LiveSite, shared_data_dir

DOMAIN = "liver_ct_segmentation"
LABEL = "real-ct-3d"


def ct_dir() -> Path:
    path = shared_data_dir() / "ibsi_sts_ct" / "dicom"
    if not path.is_dir():
        pytest.skip(f"real CT data not found at {path} (set MEDFED_TEST_DATA to the folder holding ibsi_sts_ct)")
    return path


@pytest.fixture(scope="module")
def real_ct_site(shared_site: LiveSite, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The CT studies ingested as dataset `ibsi-sts-ct`, and the two requests approved."""
    from analyses.site_requests import function_name, request_site_task
    from datasite_setup import review

    dicom = ct_dir()
    report_path = tmp_path_factory.mktemp("real-ct") / "report.json"
    shared_site.setup("ingest", str(dicom), "--dataset", "ibsi-sts-ct", "--domain", DOMAIN, "--report", str(report_path))
    ds = shared_site.ds_client()
    asset = next(d for d in ds.datasets.get_all() if d.name == "ibsi-sts-ct").assets[0]
    for task in ("local_train", "evaluate"):
        request_site_task(ds, asset, task, LABEL, max_runs=1)
    admin = shared_site.admin_client()
    for request in review.list_requests(shared_site.config, admin, status="pending"):
        if request.function in (function_name("local_train", LABEL), function_name("evaluate", LABEL)):
            review.approve(shared_site.config, admin, request.id)
    return {"site": shared_site, "ds": ds, "asset": asset, "report": json.loads(report_path.read_text()), "dicom": dicom}


def test_the_ct_studies_are_3d_cases_in_hounsfield_units_with_a_liver_ct_mock(real_ct_site: dict[str, Any]) -> None:
    report = real_ct_site["report"]
    assert len(report["accepted"]) == 6 and report["rejected"] == []
    mock = read_manifest(real_ct_site["asset"].mock)["cases"]
    assert len(mock) == 6 and all(e["split"] in ("train", "validation", "test") for e in mock)
    assert all(e["spacing"][0] == pytest.approx(3.27, abs=0.01) and e["shape"][0] >= 48 for e in mock)
    rendered = get_domain(DOMAIN).mock_cases(mock[:1])[0]  # what she develops against: no real voxel
    assert rendered["image"].shape == tuple(mock[0]["shape"]) and set(np.unique(rendered["mask"])) == {0, 1, 2}


def test_3d_training_and_sliding_window_evaluation_run_at_the_site_on_real_ct(real_ct_site: dict[str, Any]) -> None:
    from analyses.site_requests import call_site_task

    domain = get_domain(DOMAIN)
    torch.manual_seed(0)
    initial = exchanged_weights(domain.build_model())
    trained = call_site_task(real_ct_site["ds"], real_ct_site["asset"], "local_train", LABEL,
                             {"domain": DOMAIN, "weights": initial, "epochs": 1, "batch_size": 8, "lr": 1e-3,
                              "optimizer": "adam", "seed": 0, "max_steps": 1, "split": "all"})
    assert set(trained["weights"]) == set(initial)
    assert any(not np.array_equal(trained["weights"][k], initial[k]) for k in initial)
    assert trained["scalars"]["steps"] == 1.0 and np.isfinite(trained["scalars"]["train_loss"])
    assert trained["scalars"]["n_samples"] == 8.0  # one step of eight 3-D patches (the site's min_batch)
    assert trained["scalars"]["pseudo_labelled_cases"] == 0.0

    scores = call_site_task(real_ct_site["ds"], real_ct_site["asset"], "evaluate", LABEL,
                            {"domain": DOMAIN, "weights": trained["weights"], "split": "all"})
    assert scores["n_cases"] == 6.0 and scores["patients"] == 6.0
    tumour_voxels = sum(int(np.count_nonzero(case["mask"]))
                        for case in read_cases(real_ct_site["dicom"], None, os.urandom(32), progress=False).cases)
    assert scores["liver_tp"] + scores["liver_fn"] == tumour_voxels  # scored on each case's own grid, every voxel once
    assert scores["lesion_tp"] + scores["lesion_fn"] == 0.0  # the sarcoma contour is one structure
    assert 0.0 <= scores["liver_dice"] <= 1.0 and scores["liver_hd95_mm"] > 0
    log = [json.loads(line) for line in (real_ct_site["site"].config.data_dir / "audit.log").read_text().splitlines()]
    ran = [e for e in log if e.get("action") == "ran" and e.get("what") in ("task local_train", "task evaluate")][-2:]
    assert len(ran) == 2 and all(100 < e["peak_rss_mb"] < 3072 and e["cpu_seconds"] > 0 for e in ran)  # within [execution] memory_mb

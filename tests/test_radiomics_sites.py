"""Federated radiomics on live datasites: real MR split by vendor, a phantom fleet, disclosure control.

Three datasites (hospital-a/b/c, minimum cohort 2) hold two datasets each: the six real IBSI MR
studies split by vendor (two per site) and a small phantom export of the site's scanner profile.
hospital-a has a small differential-privacy budget; hospital-c allows custom code.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import SimpleITK as sitk

from analyses.federation_file import Federation, load_federation
from analyses.radiomics_run import AwaitingApproval, nyul_scale, run_radiomics, submit, submit_radiomics
from analyses.site_requests import request_site_task, call_site_task
from datasite_setup.case_store import CaseSource, cases_of_manifest
from datasite_setup.site_tasks.radiomics_aggregates import case_features
from tests.conftest import DS_EMAIL, DS_PASSWORD_ENV, LiveSite, audit_entry, free_port, ibsi_dir, run_cli, write_site_config
from tests.test_datasite_server import asset_of
from tests.test_site_execution import approve_and_run

SITES = ("hospital-a", "hospital-b", "hospital-c")
VENDOR_CASES = {"hospital-a": ("STS_001", "STS_016"), "hospital-b": ("STS_002", "STS_004"), "hospital-c": ("STS_003", "STS_005")}
PHANTOM_CASES = 5
BUDGET = 2.0
MR_PARAMS = Path(__file__).resolve().parents[1] / "analyses" / "radiomics_params" / "mr_default.yaml"
# Shape and first-order features only: fast on tiny phantom lesions, and binCount keeps the
# first-order entropy/uniformity comparable between raw scanner units and the standard scale.
PHANTOM_SETTINGS = {
    "imageType": {"Original": {}},
    "featureClass": {"shape": None, "firstorder": None},
    "setting": {"binCount": 32},
}


def approve_pending(sites: dict[str, LiveSite]) -> None:
    from datasite_setup import review

    for site in sites.values():
        admin = site.admin_client()
        for request in review.list_requests(site.config, admin, status="pending"):
            review.approve(site.config, admin, request.id)


def write_federation(folder: Path, sites: dict[str, LiveSite], dataset: str) -> Federation:
    entries = "".join(
        f'[[datasites]]\nname = "{name}"\nurl = "{site.config.url}"\nemail = "{DS_EMAIL}"\n'
        f'password_env = "{DS_PASSWORD_ENV}"\ndataset = "{dataset}"\n\n'
        for name, site in sites.items()
    )
    path = folder / f"federation-{dataset}.toml"
    path.write_text(entries)
    return load_federation(path)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveSite]]:
    """The three sites, each with its vendor's real MR studies ("ibsi") and its phantom export ("phantom").

    The servers start in parallel (each `up` is its own process); the uploads run here, one by one.
    """
    from datasite_setup.upload import ingest_to_datasite
    from domains.brain_mr_segmentation.phantom import write_phantom_site
    from domains.brain_mr_segmentation.scanner_profiles import PROFILES

    root = tmp_path_factory.mktemp("radiomics-fleet")
    sites = {
        name: LiveSite(write_site_config(
            root / "sites", name, free_port(), allow_custom_code=name == "hospital-c",
            extra=f"dp_epsilon_budget = {BUDGET}\n" if name == "hospital-a" else "",
        ))
        for name in SITES
    }
    try:
        with ThreadPoolExecutor(len(sites)) as pool:
            list(pool.map(lambda site: site.setup("up"), sites.values()))
        for name, site in sites.items():
            export = root / "ibsi" / name
            for case in VENDOR_CASES[name]:
                shutil.copytree(ibsi_dir() / "dicom" / case, export / case)
            ingest_to_datasite(site.config, export, dataset_name="ibsi")
            # Every phantom case gets a lesion (the scanner is unchanged; only the case mix is).
            profile = replace(PROFILES[name].with_size(n_slices=12), tumour_prevalence=1.0)
            write_phantom_site(profile, root / "phantom" / name, n_cases=PHANTOM_CASES, seed=11)
            ingest_to_datasite(site.config, root / "phantom" / name, dataset_name="phantom")
        yield sites
    finally:
        for site in sites.values():
            site.setup("down", check=False)


@pytest.fixture(scope="module")
def ibsi_federation(fleet: dict[str, LiveSite], tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return write_federation(tmp_path_factory.mktemp("fed"), fleet, "ibsi")


@pytest.fixture(scope="module")
def phantom_federation(fleet: dict[str, LiveSite], tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return write_federation(tmp_path_factory.mktemp("fed"), fleet, "phantom")


def private_cases(site: LiveSite, dataset: str) -> CaseSource:
    """The dataset's cases as the site reads them: its published manifest over the site's case store."""
    manifest = next(d for d in site.admin_client().datasets.get_all() if d.name == dataset).assets[0].data
    return cases_of_manifest(site.config.data_dir / "case_store", manifest)[0]


def mr_settings() -> dict[str, Any]:
    """The example MR parameter file with shape and first-order features only (GLCM triples the time)."""
    from analyses.commands.radiomics import read_params

    settings = read_params(MR_PARAMS)[0]
    return {**settings, "featureClass": {"shape": None, "firstorder": None}}


# ---- real MR, three vendors ------------------------------------------------------------------------


def _sitk_volume(array: np.ndarray, case: dict[str, Any]) -> sitk.Image:
    """The ingested [Z,Y,X] volume on its DICOM grid, built here independently of the site task."""
    image = sitk.GetImageFromArray(array)
    z, y, x = case["spacing"]
    image.SetSpacing((x, y, z))
    image.SetOrigin(tuple(case["origin"]))
    image.SetDirection(tuple(case["direction"]))
    return image


def _pyradiomics(settings: dict[str, Any], image: sitk.Image, mask: sitk.Image) -> dict[str, float]:
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    values = RadiomicsFeatureExtractor(settings).execute(image, mask)
    return {k: float(v) for k, v in values.items() if not k.startswith("diagnostics_")}


@pytest.fixture(scope="module")
def ibsi_features(fleet: dict[str, LiveSite]) -> dict[str, dict[str, dict[str, float]]]:
    """site -> case_id -> the features `case_features` computes on the ingested case."""
    settings = mr_settings()
    return {
        name: {case["case_id"]: case_features(case, settings) for case in private_cases(site, "ibsi")}
        for name, site in fleet.items()
    }


def test_case_features_equal_pyradiomics_on_the_ingested_volume_and_the_reference_nifti(
    fleet: dict[str, LiveSite], ibsi_features: dict[str, dict[str, dict[str, float]]]
) -> None:
    settings = mr_settings()
    for name, site in fleet.items():
        cases = private_cases(site, "ibsi")
        assert len(cases) == 2
        for case in cases:
            ours = ibsi_features[name][case["case_id"]]
            direct = _pyradiomics(settings, _sitk_volume(case["image"], case), _sitk_volume(case["mask"], case))
            assert set(ours) == set(direct) and len(ours) > 25
            for feature, value in direct.items():
                assert ours[feature] == pytest.approx(value, rel=1e-6, abs=1e-12), feature

            # The same tumour from the data set's own NIfTI files (matched by lesion volume in voxels).
            masks = {s: sitk.ReadImage(str(ibsi_dir() / "nifti" / s / "MR_T1_mask.nii.gz")) for s in VENDOR_CASES[name]}
            study = next(s for s, m in masks.items() if int(sitk.GetArrayFromImage(m).sum()) == int(case["mask"].sum()))
            nifti = _pyradiomics(settings, sitk.ReadImage(str(ibsi_dir() / "nifti" / study / "MR_T1_image.nii.gz")), masks[study])
            compared = [f for f in nifti if "_shape_" in f or "_firstorder_" in f]
            assert len(compared) > 25
            for feature in compared:
                assert ours[feature] == pytest.approx(nifti[feature], rel=0.03, abs=1e-6), (study, feature)


def test_site_aggregates_over_http_are_the_aggregates_of_the_case_features(
    fleet: dict[str, LiveSite], ibsi_federation: Federation, ibsi_features: dict, tmp_path: Path
) -> None:
    label = "ibsi"
    assert set(submit_radiomics(ibsi_federation, label, max_runs=3).values()) == {"pending"}
    with pytest.raises(AwaitingApproval, match="hospital-a.*hospital-b.*hospital-c"):
        run_radiomics(ibsi_federation, mr_settings(), tmp_path, label=label)
    approve_pending(fleet)

    edges = {"original_firstorder_Mean": [0.0, 150.0, 300.0, 450.0, 600.0, 1200.0]}
    outcome = run_radiomics(ibsi_federation, mr_settings(), tmp_path, intensity_edges=list(np.linspace(0, 1400, 29)),
                            feature_edges=edges, label=label)
    for name, result in outcome["aggregates"].items():
        per_case = list(ibsi_features[name].values())
        assert result["n"] == 2 and result["skipped_empty_mask"] == 0
        assert set(result["features"]) == set(per_case[0])
        for feature, group in result["features"].items():
            values = np.array([case[feature] for case in per_case])
            assert group["n"] == 2
            assert group["mean"] == pytest.approx(values.mean(), rel=1e-6, abs=1e-9), (name, feature)
            assert group["var"] == pytest.approx(values.var(ddof=1), rel=1e-6, abs=1e-9), (name, feature)
        counts = np.histogram([case["original_firstorder_Mean"] for case in per_case], edges["original_firstorder_Mean"])[0]
        counts[(counts > 0) & (counts < 2)] = 0  # the site's rule: no bin singles out fewer than min_cohort cases
        assert result["features"]["original_firstorder_Mean"]["hist"].tolist() == counts.tolist()
        assert "hist" not in result["features"]["original_shape_VoxelVolume"]
        assert result["intensity"]["counts"].sum() > 0

    # A group over fewer cases than the minimum cohort (2) returns nothing: hospital-c's two GE
    # studies come from two scanner models, so neither model is released; the vendor (2 cases) is.
    gc = outcome["aggregates"]["hospital-c"]
    assert gc["acquisition"]["ManufacturerModelName"] == {}
    assert list(gc["acquisition"]["Manufacturer"].values()) == [{"n": 2}]
    assert gc["suppressed_groups"] >= 2
    assert outcome["aggregates"]["hospital-a"]["acquisition"]["ManufacturerModelName"] == {"Avanto": {"n": 2}}

    saved = json.loads((tmp_path / "aggregates.json").read_text())
    assert saved["hospital-b"]["features"]["original_firstorder_Mean"]["n"] == 2
    assert (tmp_path / "heterogeneity.csv").read_text().startswith("feature,")
    assert (tmp_path / "heterogeneity.png").stat().st_size > 1000
    report = json.loads((tmp_path / "heterogeneity.json").read_text())
    assert report["sites"] == list(SITES) and report["n_testable"] > 25


# ---- phantom fleet: site effects and Nyul harmonization ------------------------------------------------


def _first_order_share(report: dict[str, Any]) -> float:
    entries = [e for name, e in report["features"].items() if "_firstorder_" in name and e["testable"]]
    return sum(e["significant"] for e in entries) / len(entries)


def test_the_outlier_scanner_stands_out_and_nyul_harmonization_reduces_site_effects(
    fleet: dict[str, LiveSite], phantom_federation: Federation, tmp_path: Path
) -> None:
    """Raw features through the `federate radiomics` CLI (submit, exit 5, approval, run), harmonized through the API."""
    label = "phantom"
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({**PHANTOM_SETTINGS, "federated": {"intensity_edges": list(np.linspace(0, 4000, 81))}}))
    args = ("analyses.cli", "radiomics", str(phantom_federation.path), "--params", str(params),
            "--out", str(tmp_path / "raw"), "--label", label, "--json")
    first = run_cli(*args)
    assert first.returncode == 5, first.stdout + first.stderr
    assert set(json.loads(first.stdout)["waiting"]["radiomics_aggregates"]) == set(SITES)
    submit(phantom_federation, "intensity_landmarks", label, max_runs=2)
    approve_pending(fleet)
    second = run_cli(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert json.loads(second.stdout)["sites"] == {name: PHANTOM_CASES for name in SITES}

    raw_report = json.loads((tmp_path / "raw" / "heterogeneity.json").read_text())
    smd = raw_report["site_mean_abs_smd"]
    assert max(smd, key=smd.get) == "hospital-c", smd
    distance = raw_report["intensity"]["wasserstein_mean_to_others"]
    assert max(distance, key=distance.get) == "hospital-c", distance

    harmonization = nyul_scale(phantom_federation, label)
    harmonized = run_radiomics(phantom_federation, PHANTOM_SETTINGS, tmp_path / "nyul",
                               intensity_edges=list(np.linspace(-20, 140, 81)), harmonization=harmonization, label=label)
    report = harmonized["heterogeneity"]
    assert report["share_significant"] < raw_report["share_significant"], (report["share_significant"], raw_report["share_significant"])
    assert _first_order_share(report) < _first_order_share(raw_report)
    after = report["intensity"]["wasserstein_mean_to_others"]["hospital-c"]
    assert after / 160 < distance["hospital-c"] / 4000  # relative to each histogram's span


def test_distributed_combat_through_the_sites_equals_combat_on_the_private_features_and_reduces_site_effects(
    fleet: dict[str, LiveSite], phantom_federation: Federation, tmp_path: Path
) -> None:
    """`federate radiomics` with `harmonize: combat`: raw run, then three ComBat rounds under one approval."""
    from analyses.harmonization.combat import CombatModel, fit_combat_distributed

    label = "phantom-combat"
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({**PHANTOM_SETTINGS, "federated": {"harmonize": "combat"}}))
    args = ("analyses.cli", "radiomics", str(phantom_federation.path), "--params", str(params),
            "--out", str(tmp_path / "out"), "--label", label, "--json")
    first = run_cli(*args)
    assert first.returncode == 5, first.stdout + first.stderr
    assert set(json.loads(first.stdout)["waiting"]["combat_statistics"]) == set(SITES)
    approve_pending(fleet)
    second = run_cli(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    summary = json.loads(second.stdout)
    after = summary["after_combat"]
    assert after["n_testable"] > 0 and after["share_significant"] < summary["share_significant"], summary
    assert (tmp_path / "out" / "combat" / "heterogeneity.png").stat().st_size > 10_000

    saved = json.loads((tmp_path / "out" / "combat" / "combat_model.json").read_text())
    features = saved["features"]
    site_data = {}
    for name, site in fleet.items():
        values = [case_features(case, PHANTOM_SETTINGS) for case in private_cases(site, "phantom")]
        site_data[name] = (np.array([[v[f] for f in features] for v in values]), None)
    expected = fit_combat_distributed(site_data)
    got = CombatModel.from_params(saved["model"])
    assert got.sites == expected.sites
    for field in ("grand_mean", "var_pooled", "gamma_star", "delta_star"):
        np.testing.assert_allclose(getattr(got, field), getattr(expected, field), rtol=1e-6, err_msg=field)


# ---- disclosure control ------------------------------------------------------------------------------


def test_dp_budget_is_enforced_across_requests_and_a_restart(fleet: dict[str, LiveSite]) -> None:
    site = fleet["hospital-a"]
    ds = site.ds_client()
    asset = asset_of(ds, "phantom")
    dp = {"epsilon": 1.0, "mechanism": "laplace", "bounds": {"original_firstorder_Mean": [0.0, 4000.0]}}
    settings = {"featureClass": {"firstorder": ["Mean", "Median"]}}
    params = {"settings": settings, "intensity_edges": [0.0, 2000.0, 4000.0], "dp": dp}
    for label in ("dp1", "dp2", "dp3"):
        request_site_task(ds, asset, "radiomics_aggregates", label, max_runs=3)
    approve_pending({"hospital-a": site})

    noisy = call_site_task(ds, asset, "radiomics_aggregates", "dp1", params)
    assert set(noisy) == {"n", "features", "suppressed_groups", "zeroed_bins"}  # unbounded sections withheld
    assert set(noisy["features"]) == {"original_firstorder_Mean"}  # Median has no declared bounds
    assert 0.0 <= noisy["features"]["original_firstorder_Mean"]["mean"] <= 4000.0
    call_site_task(ds, asset, "radiomics_aggregates", "dp2", params)  # another request: 2.0 of 2.0 spent
    with pytest.raises(Exception, match="budget exhausted"):
        call_site_task(ds, asset, "radiomics_aggregates", "dp3", params)

    site.setup("down")
    site.setup("up")
    ds = site.ds_client()
    with pytest.raises(Exception, match="budget exhausted"):
        call_site_task(ds, asset_of(ds, "phantom"), "radiomics_aggregates", "dp3", params)
    ledger = json.loads((site.config.data_dir / "privacy_budget.json").read_text())
    assert ledger["spent"] == {DS_EMAIL: BUDGET}
    log = [json.loads(line) for line in (site.config.data_dir / "audit.log").read_text().splitlines()]
    assert sum(1 for e in log if e["action"] == "refused-budget" and e["requested_by"] == DS_EMAIL) == 2


def per_case_feature_list(cases):
    from datasite_setup.site_tasks.radiomics_aggregates import case_features

    settings = {"featureClass": {"firstorder": ["Mean"]}}
    return {"mean_per_case": [case_features(c, settings)["original_firstorder_Mean"] for c in cases]}


def per_case_feature_array(cases):
    import numpy as np

    from datasite_setup.site_tasks.radiomics_aggregates import case_features

    settings = {"featureClass": {"firstorder": ["Mean"]}}
    return {"mean_per_case": np.array([case_features(c, settings)["original_firstorder_Mean"] for c in cases])}


@pytest.mark.parametrize("func, words", [(per_case_feature_list, "list"), (per_case_feature_array, "array")])
def test_custom_code_returning_per_case_features_is_refused(fleet: dict[str, LiveSite], func, words: str) -> None:
    site = fleet["hospital-c"]
    with pytest.raises(Exception, match="did not complete at the site") as refused:
        approve_and_run(site, func, "ibsi")
    assert words not in str(refused.value)
    entry = audit_entry(site, refused.value)
    assert entry["action"] == "refused-result" and entry["what"] == "custom code"
    assert "output contract" in entry["why"] and words in entry["why"]

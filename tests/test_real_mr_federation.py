"""The six real MR studies (IBSI soft-tissue sarcoma, three vendors) through the whole federated path.

A smoke test on real DICOM, not a study of accuracy: one datasite per vendor, each holding its
vendor's two patients, one listed for training and one for testing (`--splits`); `federate train`
with FedAvg and the local-only baseline for two short rounds; the admins approve as in the phantom
e2e tests. Two patients per site leave no one for validation (a patient is never in two splits),
so every site must decline each validation (its split is below its minimum cohort) and the run
must say so and score its final round, instead of crashing. Skipped when the shared data is absent.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest

from datasite_setup.ingest import read_cases
from datasite_setup.loopback_site import free_port
from domains import get_domain
from domains.brain_mr_segmentation import DEFAULT_FOREGROUND_PRIOR
from tests.conftest import DS_EMAIL, DS_PASSWORD_ENV, LiveSite, audit_entry, ibsi_dir, write_site_config
from tests.test_federated_training import approve_pending, federate
from tests.test_ingest_accounting import assert_each_file_once

pytestmark = pytest.mark.e2e

DOMAIN = "brain_mr_segmentation"
METHODS = ("fedavg", "local")
ROUNDS = 2
# One warm child per site, as in the demo: three sites share a loaded 2-core machine.


def study_header(study: Path) -> pydicom.Dataset:
    """The header of a study's first image file (pixels not read)."""
    return pydicom.dcmread(sorted((study / "image").glob("*.dcm"))[0], stop_before_pixels=True)


def studies_by_vendor(dicom_root: Path) -> dict[str, list[Path]]:
    """Study folders grouped by vendor: the Manufacturer tag up to " / " (these exports append the
    contouring software, e.g. "SIEMENS / MIM Software"), so each group is one vendor's hospital."""
    groups: dict[str, list[Path]] = {}
    for study in sorted(p for p in dicom_root.iterdir() if p.is_dir()):
        vendor = str(study_header(study).Manufacturer).split(" / ")[0].strip()
        groups.setdefault(vendor, []).append(study)
    return groups


def study_voxels(study: Path) -> int:
    """Voxels of a study's image series on its own grid (slices x rows x columns), where a test
    score counts every voxel once."""
    header = study_header(study)
    return len(list((study / "image").glob("*.dcm"))) * int(header.Rows) * int(header.Columns)


def site_name(vendor: str) -> str:
    """"hospital-siemens" for "SIEMENS": the vendor's first word names its site."""
    return "hospital-" + vendor.split()[0].lower()


def distinct_free_ports(n: int) -> list[int]:
    """`n` loopback ports free now and distinct from each other: the sites start at the same time,
    so a port is not yet taken by the site before when the next one is chosen."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@pytest.fixture(scope="module")
def real_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One live datasite per vendor (min_cohort 1), its two studies ingested with a split list
    putting the patient with the smaller PatientID in `train` and the other in `test`. The sites
    start and ingest side by side, as three hospitals would."""
    dicom_root = ibsi_dir() / "dicom"  # skips, saying where it looked, when the data is absent
    vendors = studies_by_vendor(dicom_root)
    assert sorted(len(s) for s in vendors.values()) == [2, 2, 2], {v: [s.name for s in st] for v, st in vendors.items()}
    root = tmp_path_factory.mktemp("real-mr")
    names = {site_name(vendor): vendor for vendor in sorted(vendors)}
    ports = dict(zip(names, distinct_free_ports(len(names))))
    sites = {name: LiveSite(write_site_config(root / "sites", name, ports[name], min_cohort=1))
             for name in names}
    exports: dict[str, Path] = {}
    patients: dict[str, dict[str, str]] = {}
    for name, vendor in names.items():
        exports[name] = root / "exports" / name
        for study in vendors[vendor]:
            shutil.copytree(study, exports[name] / study.name)
        train, test = sorted(str(study_header(s).PatientID) for s in vendors[vendor])
        patients[name] = {"train": train, "test": test}
        (root / f"{name}.splits.csv").write_text(f"PatientID,split\n{train},train\n{test},test\n")

    def up_and_ingest(name: str) -> dict[str, Any]:
        report = root / f"{name}.ingest.json"
        sites[name].setup("up")
        sites[name].setup("ingest", str(exports[name]), "--splits", str(root / f"{name}.splits.csv"), "--report", str(report))
        return json.loads(report.read_text())

    try:
        with ThreadPoolExecutor(len(names)) as pool:
            reports = dict(zip(names, pool.map(up_and_ingest, names)))
        federation = root / "federation.toml"
        federation.write_text("".join(
            f'[[datasites]]\nname = "{n}"\nurl = "{s.config.url}"\nemail = "{DS_EMAIL}"\npassword_env = "{DS_PASSWORD_ENV}"\n\n'
            for n, s in sites.items()))
        yield {"root": root, "sites": sites, "exports": exports, "patients": patients, "reports": reports,
               "federation": federation, "vendors": names}
    finally:
        for site in sites.values():
            site.setup("down", check=False)


@pytest.fixture(scope="module")
def trained(real_fleet: dict[str, Any]) -> dict[str, Any]:
    """`federate train` with FedAvg and the local-only baseline: sent, approved by every admin, run."""
    out = real_fleet["root"] / "run"
    args = ["train", str(real_fleet["federation"]), "--domain", DOMAIN, "--strategy", "fedavg", "--baselines",
            "--rounds", str(ROUNDS), "--epochs", "1", "--max-steps", "3", "--batch-size", "8",
            "--name", "realmr", "--out", str(out), "--json", "--quiet"]
    first = federate(*args)
    assert first.returncode == 5, first.stdout + first.stderr
    with ThreadPoolExecutor(len(real_fleet["sites"])) as pool:  # each admin at their own site
        approved = sum(pool.map(lambda item: approve_pending(dict([item])), real_fleet["sites"].items()))
    assert approved == 3 * 2 * 3  # per site and method: local_train, evaluate, foreground_share
    done = federate(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    return {"out": out, "summary": json.loads(done.stdout),
            "metrics": {m: json.loads((out / m / "metrics.json").read_text()) for m in METHODS}}


def test_each_vendor_site_ingests_its_two_studies_and_accounts_for_every_file(real_fleet: dict[str, Any]) -> None:
    assert sorted(real_fleet["vendors"].values()) == ["GE MEDICAL SYSTEMS", "Philips Medical Systems", "SIEMENS"]
    for name, report in real_fleet["reports"].items():
        assert_each_file_once(report, real_fleet["exports"][name])
        assert len(report["accepted"]) == 2 and report["rejected"] == [] and report["split_conflicts"] == []
        assert report["added"] == 2 and report["dataset"] == f"{name}-cases"
        description = next(d for d in real_fleet["sites"][name].ds_client().datasets.get_all() if d.name == report["dataset"]).description.text
        assert real_fleet["vendors"][name] in description and "train 1, validation 0, test 1" in description


def test_the_initial_output_prior_is_the_tumour_share_of_the_train_patients(real_fleet: dict[str, Any], trained: dict[str, Any]) -> None:
    """Pooled from the three sites' `foreground_share`, it equals the share computed here from the
    same three train patients' DICOM with the domain's own preprocessing."""
    train_studies = [real_fleet["exports"][name] / real_fleet["patients"][name]["train"] for name in real_fleet["sites"]]
    cases = [case for study in train_studies for case in read_cases(study, None, os.urandom(32), progress=False).cases]
    expected = get_domain(DOMAIN).foreground_counts(cases)
    for method in METHODS:
        prior = trained["metrics"][method]["initial_model"]
        assert prior["source"] == "pooled foreground_share" and prior["sites"] == sorted(real_fleet["sites"])
        assert prior["left_out"] == {} and prior["split"] == "train"
        assert prior["pooled"] == {**expected, "n": 3}
        assert prior["foreground_fraction"] == pytest.approx(expected["tumour_voxels"] / expected["voxels"])
        assert 0.01 < prior["foreground_fraction"] < 0.2 and prior["foreground_fraction"] != DEFAULT_FOREGROUND_PRIOR


def test_each_site_declines_validation_with_a_reason_and_the_final_round_is_selected(
    real_fleet: dict[str, Any], trained: dict[str, Any]
) -> None:
    sites = sorted(real_fleet["sites"])
    for method in METHODS:
        metrics = trained["metrics"][method]
        assert metrics["rounds_completed"] == ROUNDS and [r["round"] for r in metrics["history"]] == list(range(ROUNDS + 1))
        assert metrics["missed"] == {}
        for record in metrics["history"][1:]:
            assert sorted(record["aggregated"]) == sites and record["missed"] == {} and record["rejected"] == {}
            assert all(math.isfinite(loss) for loss in record["train_loss"].values())
        selection = metrics["selection"]
        assert selection["split"] == "validation" and selection["best_round"] == ROUNDS
        assert selection["validation_value"] is None and "the final round is used" in selection["note"]
        assert metrics["best"]["round"] == metrics["final"]["round"] == ROUNDS
        assert trained["summary"]["best_round"][method] == ROUNDS
        left_out = metrics["left_out"]
        assert sorted(left_out) == sites
        assert trained["summary"]["left_out"][method] == left_out
        for site, entries in left_out.items():
            assert [(e["round"], e["phase"]) for e in entries] == [(r, "validation") for r in range(ROUNDS + 1)]
            for entry in entries:  # the data scientist reads a reference, the site's admin the reason
                why = audit_entry(real_fleet["sites"][site], entry["reason"])["why"]
                assert "0 cases in split 'validation'" in why and "minimum cohort of 1" in why, why


def test_every_site_scores_the_selected_and_final_weights_on_its_test_patient(
    real_fleet: dict[str, Any], trained: dict[str, Any]
) -> None:
    sites = sorted(real_fleet["sites"])
    test_voxels = {name: study_voxels(real_fleet["exports"][name] / real_fleet["patients"][name]["test"]) for name in sites}
    for method in METHODS:
        for which in ("best", "final"):
            scores = trained["metrics"][method][which]
            assert scores["split"] == "test" and scores["missed"] == {} and sorted(scores["site_metrics"]) == sites
            for site, values in scores["site_metrics"].items():
                assert values["n_cases"] == 1.0 and values["tp"] + values["fn"] > 0  # the test patient's tumour
                assert sum(values[k] for k in ("tp", "fp", "tn", "fn")) == test_voxels[site]  # its whole grid, not the train patient's
                assert math.isfinite(values["dice"]) and 0.0 <= values["dice"] <= 1.0, (method, which, site, values)
            assert 0.0 <= scores["pooled"]["dice"] <= 1.0 and scores["pooled"]["n_cases"] == 3.0
            table = trained["summary"][which][method]
            assert set(table) == {*sites, "pooled"} and all(0.0 <= v <= 1.0 for v in table.values())
    cross = trained["summary"]["cross_site"]["local"]["final"]
    assert sorted(cross) == sites
    assert all(set(at) == {*(s for s in sites if s != model), "pooled (other sites)"} and all(0.0 <= v <= 1.0 for v in at.values())
               for model, at in cross.items())

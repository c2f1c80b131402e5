"""Federated training against three live datasites holding different scanners' phantom DICOM.

The data scientist drives `federate train` exactly as on the command line; each clinic admin
approves with the review functions behind `datasite-admin` (the CLI itself once). Sites, data
and the federation file are shared by the module to keep the suite short.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import syft as sy
from syft.service.policy.policy import OutputPolicyExecuteCount

from analyses.federation.centralized import read_site_exports
from analyses.federation.experiment import links_for, submit
from analyses.federation.orchestrator import Orchestrator, TrainingPlan
from analyses.federation.site_link import DatasiteLink
from analyses.federation_file import load_federation
from datasite_setup.model_weights import exchanged_weights
from datasite_setup.site_tasks import local_train
from datasite_setup.site_tasks.task import SiteFacts
from datasite_setup import review
from domains import get_domain
from demo.hospital_it import write_split_list
from domains.brain_mr_segmentation import PROFILES, write_phantom_site
from tests.conftest import DS_EMAIL, DS_PASSWORD_ENV, REPO, LiveSite, audit_entry, start_site

SITES = ("hospital-a", "hospital-b", "hospital-c")
pytestmark = pytest.mark.e2e


def federate(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analyses.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def approve_pending(sites: dict[str, LiveSite]) -> int:
    """Every site's admin approves every pending request (what `datasite-admin approve` does)."""
    approved = 0
    for site in sites.values():
        config, admin = site.config, site.admin_client()
        for request in review.list_requests(config, admin, status="pending"):
            review.approve(config, admin, request.id)
            approved += 1
    return approved


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    """Three datasites, each with 6 small phantom cases of its own scanner (every case with a
    lesion: at the scanners' own prevalence a small site can hold 4 lesion slices of 48, too few
    to learn from in a few rounds), split 2 / 2 / 2 by the site's split list, and a federation file."""
    root = tmp_path_factory.mktemp("fleet")
    sites: dict[str, LiveSite] = {}
    exports: dict[str, Path] = {}
    try:
        for seed, name in enumerate(SITES):
            exports[name] = root / "exports" / name
            profile = replace(PROFILES[name].with_size(matrix=48, n_slices=12), tumour_prevalence=1.0)
            case_dirs = write_phantom_site(profile, exports[name], n_cases=6, seed=seed)
            write_split_list(root / f"{name}.splits.csv", [d.name for d in case_dirs], min_cohort=2)
            sites[name] = start_site(root / "sites", name, min_cohort=2)
            sites[name].setup("ingest", str(exports[name]), "--splits", str(root / f"{name}.splits.csv"))
        federation = root / "federation.toml"
        federation.write_text("".join(
            f'[[datasites]]\nname = "{n}"\nurl = "{s.config.url}"\nemail = "{DS_EMAIL}"\npassword_env = "{DS_PASSWORD_ENV}"\n\n'
            for n, s in sites.items()))
        yield {"root": root, "sites": sites, "exports": exports, "federation": federation}
    finally:
        for site in sites.values():
            site.setup("down", check=False)


def test_fedavg_and_fedprox_improve_dice_over_the_initial_model_with_baselines(fleet) -> None:
    out = fleet["root"] / "run-seg"
    args = ["train", str(fleet["federation"]), "--strategy", "fedavg,fedprox", "--rounds", "3", "--epochs", "2", "--max-steps", "12",
            "--baselines", "--out", str(out), "--json", "--quiet",
            *[f"--centralized-data={n}={p}" for n, p in fleet["exports"].items()]]
    first = federate(*args)
    assert first.returncode == 5, first.stdout + first.stderr
    waiting = json.loads(first.stdout)
    assert waiting["status"] == "awaiting-approval" and set(waiting["requests"]) == set(SITES)

    site_a = fleet["sites"]["hospital-a"]
    pending = json.loads(site_a.admin("requests", "--status", "pending", "--json").stdout)
    assert len(pending) == 9  # local_train + evaluate + foreground_share for fedavg, fedprox and the local baseline
    shown = json.loads(site_a.admin("show", pending[0]["id"], "--json").stdout)
    assert shown["kind"] == "site task" and shown["task"]["source_hash"]
    site_a.admin("approve", pending[0]["id"])
    approve_pending(fleet["sites"])

    done = federate(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    for strategy in ("fedavg", "fedprox"):
        metrics = json.loads((out / strategy / "metrics.json").read_text())
        initial = metrics["history"][0]["pooled"]["dice"]  # the initial model on the validation split
        chosen = metrics["selection"]["validation_value"]
        assert metrics["selection"]["split"] == "validation" and chosen > initial + 0.05, (strategy, initial, chosen)
        assert metrics["final"]["split"] == metrics["best"]["split"] == "test"
        assert 0 < metrics["best"]["pooled"]["dice"] <= 1 and 0 < metrics["final"]["pooled"]["dice"] <= 1
        assert metrics["rounds_completed"] == 3 and metrics["missed"] == {}
        prior = metrics["initial_model"]  # the output prior pooled from every site's train split
        assert prior["source"] == "pooled foreground_share" and prior["sites"] == sorted(SITES)
        assert 0 < prior["foreground_fraction"] < 1 and prior["pooled"]["n"] == 3 * 2
        assert (out / strategy / "training_curves.png").stat().st_size > 10_000
        assert (out / strategy / "metrics.csv").read_text().startswith("strategy,round,site,status,train_loss")
    table = summary["final"]
    assert set(table) == {"fedavg", "fedprox", "local", "centralized (simulation)"}
    central = json.loads((out / "centralized" / "metrics.json").read_text())
    assert central["initial_model"] == json.loads((out / "fedavg" / "metrics.json").read_text())["initial_model"]
    assert all(0 <= v <= 1 for method in table.values() for v in method.values())
    assert (out / "comparison.png").stat().st_size > 10_000
    audit = json.loads(site_a.admin("audit-log", "--json").stdout)
    assert sum(1 for e in audit if e.get("action") == "ran" and e.get("what") == "task local_train") == 9


def _wait_for_round(out: Path, round_no: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    progress = out / "checkpoint" / "progress.json"
    while time.monotonic() < deadline:
        if progress.is_file() and json.loads(progress.read_text())["round"] >= round_no:
            return
        if proc.poll() is not None:
            raise AssertionError(f"federate exited early: {proc.stdout.read()} {proc.stderr.read()}")
        time.sleep(0.5)
    raise AssertionError(f"round {round_no} not reached in {timeout} s")


def test_resume_after_the_orchestrator_is_killed_needs_no_new_approval(fleet) -> None:
    out = fleet["root"] / "run-resume"
    args = ["train", str(fleet["federation"]), "--strategy", "fedavg", "--rounds", "3", "--max-steps", "3",
            "--name", "resume", "--out", str(out), "--json", "--quiet"]
    assert federate(*args).returncode == 5
    approve_pending(fleet["sites"])
    proc = subprocess.Popen([sys.executable, "-m", "analyses.cli", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_round(out, 1, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = json.loads((out / "checkpoint" / "progress.json").read_text())["round"]
    assert killed_at < 3

    again = federate(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout)["resumed_from"] == {"fedavg": killed_at}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds_completed"] == 3 and [r["round"] for r in metrics["history"]] == [0, 1, 2, 3]
    for site in fleet["sites"].values():
        assert review.list_requests(site.config, site.admin_client(), status="pending") == []


def test_a_site_killed_mid_run_is_skipped_and_the_run_finishes(fleet) -> None:
    out = fleet["root"] / "run-site-down"
    args = ["train", str(fleet["federation"]), "--strategy", "fedavg", "--rounds", "3", "--max-steps", "3",
            "--name", "sitedown", "--timeout", "120", "--out", str(out), "--json", "--quiet"]
    assert federate(*args).returncode == 5
    approve_pending(fleet["sites"])
    proc = subprocess.Popen([sys.executable, "-m", "analyses.cli", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    site_c = fleet["sites"]["hospital-c"]
    try:
        _wait_for_round(out, 1, proc)
        site_c.setup("down")
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        site_c.setup("up")
    assert proc.returncode == 0, stdout + stderr
    metrics = json.loads(stdout)
    missed = metrics["missed"]["fedavg"]
    assert list(missed) == ["hospital-c"] and 3 in missed["hospital-c"]
    final = json.loads((out / "metrics.json").read_text())
    assert final["rounds_completed"] == 3
    assert "hospital-c" in final["history"][-1]["eval_missed"]


@dataclass
class DivergingLink:
    """hospital-a's real link, but its copy of the global model is scaled by 1e30 on the way, so its
    local training overflows: what comes out of the site is NaN/Inf, as from a diverging site."""

    inner: DatasiteLink

    @property
    def name(self) -> str:
        return self.inner.name

    def train(self, params: dict) -> dict:
        blown_up = {k: (v * np.float32(1e30)).astype(v.dtype) for k, v in params["weights"].items()}
        return self.inner.train({**params, "weights": blown_up})

    def evaluate(self, params: dict) -> dict:
        return self.inner.evaluate(params)

    def foreground(self, params: dict) -> dict:
        return self.inner.foreground(params)


def test_a_nan_update_is_refused_at_the_site_and_the_round_goes_on_without_it(fleet) -> None:
    plan = TrainingPlan(domain="brain_mr_segmentation", strategy="fedavg", rounds=1, max_steps=2, name="diverge",
                        min_sites=2)
    federation = load_federation(fleet["federation"])
    submit(federation, [plan])
    approve_pending(fleet["sites"])
    links = links_for(federation, plan)
    links[0] = DivergingLink(links[0])
    assert links[0].name == "hospital-a"
    report = Orchestrator(plan, links, fleet["root"] / "run-diverge", progress=False).run()

    record = report.history[1]
    assert record["aggregated"] == ["hospital-b", "hospital-c"]
    assert "did not complete at the site" in record["missed"]["hospital-a"]
    assert "NaN" not in record["missed"]["hospital-a"]  # the reason is the admin's to read
    entry = audit_entry(fleet["sites"]["hospital-a"], record["missed"]["hospital-a"])
    assert "output contract" in entry["why"] and "NaN" in entry["why"]
    assert all(np.isfinite(w).all() for w in report.final_state["global"].values())


def test_fedavg_full_batch_step_through_the_sites_equals_centralized_gradient_descent(fleet) -> None:
    """One SGD step per site on its full data, averaged by the orchestrator, equals one gradient
    step on the pooled data computed here from the same exports (regression domain: mean loss,
    no batch statistics, fixed slice size)."""
    out = fleet["root"] / "run-exact"
    args = ["train", str(fleet["federation"]), "--domain", "brain_mr_tumour_burden", "--strategy", "fedavg",
            "--rounds", "1", "--optimizer", "sgd", "--lr", "0.05", "--batch-size", "4096", "--max-steps", "1",
            "--name", "exact", "--out", str(out), "--json", "--quiet"]
    assert federate(*args).returncode == 5
    approve_pending(fleet["sites"])
    done = federate(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    with np.load(out / "final_weights.npz") as saved:
        federated = {key.split("::", 1)[1]: saved[key] for key in saved.files}

    domain = get_domain("brain_mr_tumour_burden")
    import torch

    torch.manual_seed(0)
    initial = exchanged_weights(domain.build_model())
    pooled = [c for cases in read_site_exports(_train_exports(fleet)).values() for c in cases]
    params = {"domain": domain.name, "weights": initial, "epochs": 1, "batch_size": 4096, "lr": 0.05,
              "optimizer": "sgd", "seed": 0, "max_steps": 1}
    central = local_train.run(pooled, params, SiteFacts(min_cohort=1))["weights"]
    assert max(float(np.abs(central[k] - initial[k]).max()) for k in initial) > 1e-3
    for key in initial:
        np.testing.assert_allclose(federated[key], central[key], rtol=1e-4, atol=1e-5)


def _train_exports(fleet) -> dict[str, Path]:
    """Each site's export reduced to its training split (what `local_train` reads at the site)."""
    exports = {}
    for name, export in fleet["exports"].items():
        listed = (fleet["root"] / f"{name}.splits.csv").read_text().splitlines()[1:]
        train = [row.split(",")[0] for row in listed if row.endswith(",train")]
        exports[name] = fleet["root"] / "train-exports" / name
        exports[name].mkdir(parents=True, exist_ok=True)
        for case in train:
            if not (exports[name] / case).exists():
                (exports[name] / case).symlink_to(export / case)
    return exports


def leaky_local_train(cases, params):
    return {"weights": {"head.weight": cases[0]["image"]}, "scalars": {"n_samples": 1.0, "train_loss": 0.0}}


def test_a_request_returning_an_input_image_is_refused_by_the_guard(shared_site: LiveSite) -> None:
    from tests.test_datasite_server import asset_of, upload_small_dataset

    upload_small_dataset(shared_site, "leak-target")
    ds = shared_site.ds_client()
    asset = asset_of(ds, "leak-target")
    code = sy.syft_function(input_policy=sy.MixedInputPolicy(cases=asset, params=dict, client=ds),
                            output_policy=OutputPolicyExecuteCount(limit=1))(leaky_local_train)
    ds.code.request_code_execution(code)
    config, admin = shared_site.config, shared_site.admin_client()
    request = next(r for r in review.list_requests(config, admin, status="pending") if r.function == "leaky_local_train")
    review.approve(config, admin, request.id)
    with pytest.raises(Exception) as refused:
        result = shared_site.ds_client().code.leaky_local_train(cases=asset, params={})
        if isinstance(result, sy.SyftError):
            raise RuntimeError(result.message)
        result.get()
    message = str(refused.value)
    assert "did not complete at the site" in message
    assert "100." not in message and "Traceback" not in message
    assert "output contract" in audit_entry(shared_site, message)["why"]

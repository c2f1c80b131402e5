"""What runs inside a hospital, on live datasites: isolation, output contracts, limits, site tasks."""

from __future__ import annotations

import json

import pytest
import syft as sy
from syft.service.policy.policy import OutputPolicyExecuteCount

from analyses.site_requests import request_site_task, call_site_task, thin_function
from tests.conftest import LiveSite, audit_entry, start_site
from tests.test_datasite_server import asset_of, requests_json, upload_small_dataset


def probe_read_file(cases):
    return {"bytes": float(len(open("/etc/hostname").read()))}


def probe_socket(cases):
    import socket

    socket.create_connection(("127.0.0.1", 22), timeout=1)
    return {"connected": 1.0}


def probe_subprocess(cases):
    import subprocess

    return {"exit": float(subprocess.run(["true"]).returncode + 1)}


def probe_environment(cases):
    import os

    return {"secrets": float(sum(1 for k in os.environ if "PASSWORD" in k or k.startswith(("SYFT", "DATASITE", "MEDFED"))))}


def probe_server_registry(cases):
    from syft.server.server import ServerRegistry

    servers = ServerRegistry.get_all_servers()
    users = sum(len(s.services.user.stash.get_all(s.verify_key).unwrap()) for s in servers)
    return {"servers": float(len(servers)), "users": float(users)}


def probe_other_datasets(cases):
    import gc

    foreign = [o for o in gc.get_objects() if isinstance(o, dict) and "case_id" in o and all(o is not c for c in cases)]
    return {"foreign_cases": float(len(foreign))}


def returns_pixels(cases):
    return {"pixels": cases[0]["image"]}


def returns_per_case(cases):
    return {"per_case": [float(c["image"].mean()) for c in cases]}


def returns_nan(cases):
    return {"value": float("nan")}


def returns_text(cases):
    return {"case": str(cases[0]["case_id"])}


def eats_memory(cases):
    import numpy as np

    block = np.ones((16 * 1024, 1024, 64), dtype=np.float64)  # 8 GiB
    return {"sum": float(block.sum())}


def never_ends(cases):
    while True:
        pass


def approve_and_run(site: LiveSite, func, dataset: str):
    """Submit `func` as custom code, approve it with the admin's Python API, run it once."""
    from datasite_setup import review

    ds = site.ds_client()
    asset = asset_of(ds, dataset)
    code = sy.syft_function(
        input_policy=sy.MixedInputPolicy(cases=asset, client=ds), output_policy=OutputPolicyExecuteCount(limit=1)
    )(func)
    ds.code.request_code_execution(code)
    admin = site.admin_client()
    pending = review.list_requests(site.config, admin, status="pending")
    review.approve(site.config, admin, next(r.id for r in pending if r.function == func.__name__))
    result = getattr(ds.code, func.__name__)(cases=asset)
    if isinstance(result, sy.SyftError):
        raise RuntimeError(result.message)
    return result.get()


@pytest.fixture(scope="module")
def probe_dataset(shared_site: LiveSite) -> str:
    upload_small_dataset(shared_site, "probe-target")
    upload_small_dataset(shared_site, "other-study")
    return "probe-target"


@pytest.mark.parametrize(
    "probe",
    [probe_read_file, probe_socket, probe_subprocess, probe_environment, probe_server_registry, probe_other_datasets],
)
def test_escape_probe_approved_as_custom_code_gets_nothing_out(shared_site: LiveSite, probe_dataset: str, probe) -> None:
    """Each attempt is either refused by the sandbox or finds nothing (a zero) to take out."""
    try:
        found = approve_and_run(shared_site, probe, probe_dataset)
    except Exception as exc:
        assert "did not complete at the site" in str(exc)
        assert "Traceback" not in str(exc)
        return
    assert found == {k: 0.0 for k in found}, found


@pytest.mark.parametrize(
    "func, words",
    [
        (returns_pixels, "array"),
        (returns_per_case, "list"),
        (returns_nan, "finite"),
        (returns_text, "string"),
    ],
)
def test_results_that_break_the_contract_are_refused(shared_site: LiveSite, probe_dataset: str, func, words: str) -> None:
    with pytest.raises(Exception, match="did not complete at the site") as refused:
        approve_and_run(shared_site, func, probe_dataset)
    assert words not in str(refused.value)  # the data scientist learns that it was refused, not why
    entry = audit_entry(shared_site, refused.value)
    assert entry["action"] == "refused-result" and entry["requested_by"] == "ds@uni.example"
    assert "output contract" in entry["why"] and words in entry["why"]


@pytest.mark.parametrize("func, failure", [(eats_memory, "memory"), (never_ends, "timeout")])
def test_a_run_past_its_limits_is_stopped_and_the_site_keeps_serving(
    shared_site: LiveSite, probe_dataset: str, func, failure: str
) -> None:
    with pytest.raises(Exception, match="did not complete at the site") as refused:
        approve_and_run(shared_site, func, probe_dataset)
    assert audit_entry(shared_site, refused.value)["failure"] == failure
    assert json.loads(shared_site.setup("status", "--json").stdout)["answering"]
    assert shared_site.ds_client().datasets.get_all()


@pytest.fixture(scope="module")
def strict_site(site_pool: dict[str, LiveSite], tmp_path_factory: pytest.TempPathFactory) -> LiveSite:
    """A site with the defaults a hospital gets: site tasks only, no custom code (training steps of
    4 slices allowed: its phantom cases have 12 slices in all)."""
    if "strict" not in site_pool:
        site = start_site(tmp_path_factory.mktemp("strict-site"), "hospital-strict", extra="min_batch = 4\n")
        site_pool["strict"] = site
        upload_small_dataset(site, "cohort")
    return site_pool["strict"]


def test_custom_code_is_refused_at_review_on_a_site_tasks_only_site(strict_site: LiveSite) -> None:
    ds = strict_site.ds_client()
    asset = asset_of(ds, "cohort")
    code = sy.syft_function(
        input_policy=sy.MixedInputPolicy(cases=asset, client=ds), output_policy=OutputPolicyExecuteCount(limit=1)
    )(probe_read_file)
    ds.code.request_code_execution(code)
    row = next(r for r in requests_json(strict_site) if r["function"] == "probe_read_file")
    shown = json.loads(strict_site.admin("show", row["id"], "--json", check=False).stdout)
    assert shown["kind"] == "custom code"
    refused = strict_site.admin("approve", row["id"], check=False)
    assert refused.returncode == 1 and "custom code" in refused.stderr
    assert next(r for r in requests_json(strict_site) if r["function"] == "probe_read_file")["status"] == "pending"


def test_site_task_runs_through_a_thin_request_and_returns_aggregates_only(strict_site: LiveSite) -> None:
    ds = strict_site.ds_client()
    asset = asset_of(ds, "cohort")
    request_site_task(ds, asset, "cohort_summary", "by_vendor", max_runs=2)
    row = next(r for r in requests_json(strict_site) if r["function"] == "cohort_summary_by_vendor")
    shown = json.loads(strict_site.admin("show", row["id"], "--json").stdout)
    assert shown["kind"] == "site task" and shown["task"]["name"] == "cohort_summary" and shown["task"]["enabled"]
    assert len(shown["task"]["source_hash"]) == 64
    strict_site.admin("approve", row["id"])

    summary = call_site_task(ds, asset, "cohort_summary", "by_vendor", {"group_by": "Manufacturer"})
    assert set(summary) == {"unknown"}  # the tiny test cases carry no acquisition metadata
    group = summary["unknown"]
    assert group["n"] == 3 and 80 < group["lesion_intensity_mean"] < 120

    with pytest.raises(Exception, match="parameters refused"):
        call_site_task(ds, asset, "cohort_summary", "by_vendor", {"group_by": "PatientName"})


def test_training_tasks_run_in_the_isolated_child_and_return_only_weights(strict_site: LiveSite) -> None:
    """local_train and evaluate import torch and the domain (pydicom among it) inside the sandbox."""
    import torch

    from datasite_setup.model_weights import declared_shapes, exchanged_weights
    from datasite_setup import review
    from domains import get_domain

    from tests.test_datasite_server import upload_tiny_phantom

    upload_tiny_phantom(strict_site, "phantom-train", 3)
    ds = strict_site.ds_client()
    asset = asset_of(ds, "phantom-train")
    for task in ("local_train", "evaluate"):
        request_site_task(ds, asset, task, "child", max_runs=1)
    config, admin = strict_site.config, strict_site.admin_client()
    for request in review.list_requests(config, admin, status="pending"):
        if request.function in ("local_train_child", "evaluate_child"):
            review.approve(config, admin, request.id)
    domain = get_domain("brain_mr_segmentation")
    torch.manual_seed(0)
    weights = exchanged_weights(domain.build_model())
    trained = call_site_task(ds, asset, "local_train", "child", {
        "domain": domain.name, "weights": weights, "epochs": 1, "batch_size": 4, "lr": 1e-3,
        "optimizer": "adam", "seed": 0, "max_steps": 2, "split": "all"})  # uploaded records carry no split
    assert set(trained) == {"weights", "scalars"} and set(trained["scalars"]) == {"n_samples", "train_loss", "steps", "compute_seconds",
                                                                              "pseudo_labelled_cases"}
    assert {k: v.shape for k, v in trained["weights"].items()} == declared_shapes(domain.build_model())
    assert trained["scalars"]["steps"] == 2.0
    scores = call_site_task(ds, asset, "evaluate", "child", {"domain": domain.name, "weights": trained["weights"],
                                                             "split": "all"})
    assert scores["n_cases"] == 3.0 and 0.0 <= scores["dice"] <= 1.0


def test_a_thin_request_with_extra_code_is_custom_code() -> None:
    import inspect

    from datasite_setup.thin_requests import parse_thin_request

    assert parse_thin_request(inspect.getsource(thin_function("cohort_summary", "x"))).task == "cohort_summary"
    assert parse_thin_request(inspect.getsource(probe_read_file)) is None
    smuggled = 'def f(cases, params):\n    import os\n    return site_task("cohort_summary", cases, params)\n'
    assert parse_thin_request(smuggled) is None
    renamed = 'def f(cases, params):\n    return site_task("cohort_summary", params, cases)\n'
    assert parse_thin_request(renamed) is None


def test_admin_lists_installed_tasks_and_which_the_site_enables(tmp_path) -> None:
    from tests.conftest import run_cli, write_site_config

    config = write_site_config(tmp_path, "hospital-tasks", 1, extra="")
    text = config.read_text().replace("allow_custom_code = false", 'allow_custom_code = false\nenabled_tasks = ["evaluate"]')
    config.write_text(text)
    rows = json.loads(run_cli("datasite_setup.admin_cli", "--site", str(config), "tasks", "--json", check=True).stdout)
    by_name = {row["name"]: row for row in rows}
    assert {"cohort_summary", "local_train", "evaluate"} <= set(by_name)
    assert by_name["evaluate"]["enabled"] and not by_name["local_train"]["enabled"]
    assert all(len(row["source_hash"]) == 64 for row in rows)

"""A hospital's datasite as its users meet it: live servers over HTTP, real accounts and requests."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import syft as sy
from syft.service.policy.policy import OutputPolicyExecuteCount

from tests.conftest import DS_EMAIL, LiveSite, start_site


def upload_small_dataset(site: LiveSite, name: str) -> list[dict]:
    """A dataset of three tiny cases, uploaded as the admin (ingestion has its own tests)."""
    rng = np.random.default_rng(7)
    cases = [
        {
            "case_id": f"case-{i}",
            "image": rng.normal(100, 10, (4, 8, 8)).astype(np.float32),
            "mask": np.ones((4, 8, 8), np.uint8),
            "spacing": [2.0, 1.0, 1.0],
            "metadata": {},
        }
        for i in range(3)
    ]
    mock = [
        {**case, "case_id": f"mock-{i}", "image": np.zeros((4, 8, 8), np.float32), "mask": np.zeros((4, 8, 8), np.uint8)}
        for i, case in enumerate(cases)
    ]
    dataset = sy.Dataset(name=name, description="three tiny cases")
    dataset.add_asset(sy.Asset(name="cases", data=cases, mock=mock))
    assert not isinstance(site.admin_client().upload_dataset(dataset), sy.SyftError)
    return cases


def asset_of(client, dataset_name: str):
    return next(d for d in client.datasets.get_all() if d.name == dataset_name).assets[0]


def upload_tiny_phantom(site, name: str, n_cases: int) -> None:
    """`n_cases` hospital-a phantom cases (16 x 16 x 4) uploaded as dataset `name`, with a zeroed mock."""
    import numpy as np

    from domains.brain_mr_segmentation import PROFILES, generate_case

    rng = np.random.default_rng(0)
    profile = PROFILES["hospital-a"].with_size(matrix=16, n_slices=4)
    cases = [generate_case(profile, rng).as_record(f"case-{i}") for i in range(n_cases)]
    mock = [{**c, "case_id": f"mock-{i}", "image": np.zeros_like(c["image"])} for i, c in enumerate(cases)]
    dataset = sy.Dataset(name=name, description=f"{n_cases} tiny phantom cases")
    dataset.add_asset(sy.Asset(name="cases", data=cases, mock=mock))
    assert not isinstance(site.admin_client().upload_dataset(dataset), sy.SyftError)


# Each request needs its own code (syft refuses a second request with identical code), so the
# same two-line body appears under several names; each runs at the site, not here.
def mean_budgeted(cases):
    return {"n": len(cases), "mean": float(sum(c["image"].mean() for c in cases) / len(cases))}


def mean_denied(cases):
    return {"n": len(cases), "mean": float(sum(c["image"].mean() for c in cases) / len(cases))}


def mean_capped(cases):
    return {"n": len(cases), "mean": float(sum(c["image"].mean() for c in cases) / len(cases))}


def mean_self_approved(cases):
    return {"n": len(cases), "mean": float(sum(c["image"].mean() for c in cases) / len(cases))}


def mean_persistent(cases):
    return {"n": len(cases), "mean": float(sum(c["image"].mean() for c in cases) / len(cases))}


def submit_request(ds, asset, func, limit: int):
    """Submit `func` as a code request on `asset`, runnable `limit` times once approved."""
    policy = sy.MixedInputPolicy(cases=asset, client=ds)
    code = sy.syft_function(input_policy=policy, output_policy=OutputPolicyExecuteCount(limit=limit))(func)
    request = ds.code.request_code_execution(code)
    assert not isinstance(request, sy.SyftError), request
    return request


def run(ds, name: str, asset):
    return getattr(ds.code, name)(cases=asset)


def requests_json(site: LiveSite) -> list[dict]:
    return json.loads(site.admin("requests", "--json").stdout)


def test_up_is_idempotent_and_status_reports_json(shared_site: LiveSite) -> None:
    first = json.loads(shared_site.setup("status", "--json").stdout)
    again = json.loads(shared_site.setup("up", "--json").stdout)
    assert first["answering"] and again["answering"]
    assert again["pid"] == first["pid"]
    assert again["accounts_created"] == []


def test_credentials_are_private_and_default_root_is_unusable(shared_site: LiveSite) -> None:
    config = shared_site.config
    secrets = config.secrets_dir
    for name in ("admin_password", "server_identity.json", "pseudonym_key"):
        if (secrets / name).exists():
            assert stat.S_IMODE(os.stat(secrets / name).st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(secrets).st_mode) == 0o700
    with pytest.raises(Exception):
        sy.login(url="http://127.0.0.1", port=config.port, email="info@openmined.org", password="changethis")
    with pytest.raises(Exception):
        result = sy.register(
            url="http://127.0.0.1", port=config.port, name="Mallory", email="mallory@x.example",
            password="pw123456", password_verify="pw123456",
        )
        if isinstance(result, sy.SyftError) or result is None:
            raise RuntimeError("registration refused")


def test_data_scientist_sees_mock_but_not_private(shared_site: LiveSite) -> None:
    cases = upload_small_dataset(shared_site, "visible-mock")
    ds = shared_site.ds_client()
    asset = asset_of(ds, "visible-mock")
    mock = asset.mock
    assert [m["case_id"] for m in mock] == ["mock-0", "mock-1", "mock-2"]
    assert all(float(np.abs(m["image"]).sum()) == 0.0 for m in mock)
    private = asset.data
    assert private is None or isinstance(private, sy.SyftError)
    assert cases[0]["image"].sum() != 0


def test_only_approved_code_runs_and_only_up_to_its_limit(shared_site: LiveSite) -> None:
    upload_small_dataset(shared_site, "budgeted")
    ds = shared_site.ds_client()
    asset = asset_of(ds, "budgeted")
    submit_request(ds, asset, mean_budgeted, limit=2)
    submit_request(ds, asset, mean_denied, limit=2)

    with pytest.raises(Exception, match="(?i)approv"):
        result = run(ds, "mean_budgeted", asset)
        if isinstance(result, sy.SyftError):
            raise RuntimeError(result.message)

    rows = {r["function"]: r for r in requests_json(shared_site)}
    assert rows["mean_budgeted"]["status"] == "pending"
    shared_site.admin("deny", rows["mean_denied"]["id"][:10], "--reason", "not needed for the study")
    shared_site.admin("approve", rows["mean_budgeted"]["id"][:10])

    with pytest.raises(Exception):
        result = run(ds, "mean_denied", asset)
        if isinstance(result, sy.SyftError):
            raise RuntimeError(result.message)

    values = [run(ds, "mean_budgeted", asset).get() for _ in range(2)]
    assert all(v["n"] == 3 and 80 < v["mean"] < 120 for v in values)
    with pytest.raises(Exception, match="budget used up"):
        run(ds, "mean_budgeted", asset)

    rows = {r["function"]: r for r in requests_json(shared_site)}
    assert (rows["mean_budgeted"]["runs_used"], rows["mean_budgeted"]["runs_allowed"]) == (2, 2)
    assert rows["mean_denied"]["status"] == "rejected"
    log = json.loads(shared_site.admin("audit-log", "--json").stdout)
    decisions = {(e["function"], e["action"]) for e in log if "function" in e}  # review decisions
    assert {("mean_budgeted", "approve"), ("mean_denied", "deny")} <= decisions
    assert next(e for e in log if e["action"] == "deny")["reason"] == "not needed for the study"


def test_admin_can_cap_runs_below_the_request(shared_site: LiveSite) -> None:
    upload_small_dataset(shared_site, "capped")
    ds = shared_site.ds_client()
    asset = asset_of(ds, "capped")
    submit_request(ds, asset, mean_capped, limit=5)
    row = next(r for r in requests_json(shared_site) if r["function"] == "mean_capped")
    approved = json.loads(shared_site.admin("approve", row["id"], "--max-runs", "1", "--json").stdout)
    assert approved["runs_allowed"] == 1
    assert run(ds, "mean_capped", asset).get()["n"] == 3
    with pytest.raises(Exception, match="1 of 1 runs"):
        run(ds, "mean_capped", asset)


def test_show_flags_dangerous_code_and_exit_code_says_so(shared_site: LiveSite) -> None:
    upload_small_dataset(shared_site, "probed")
    ds = shared_site.ds_client()
    asset = asset_of(ds, "probed")

    @sy.syft_function(input_policy=sy.MixedInputPolicy(cases=asset, client=ds), output_policy=OutputPolicyExecuteCount(limit=1))
    def leak_probe(cases):
        import socket

        return {"pixels": cases[0]["image"], "host": open("/etc/hostname").read(), "s": socket.gethostname()}

    ds.code.request_code_execution(leak_probe)
    row = next(r for r in requests_json(shared_site) if r["function"] == "leak_probe")
    shown = shared_site.admin("show", row["id"], "--json", check=False)
    assert shown.returncode == 4
    messages = " | ".join(f["message"] for f in json.loads(shown.stdout)["findings"])
    assert "socket" in messages and "open()" in messages and "image or mask data" in messages


def test_data_scientist_cannot_act_as_admin(shared_site: LiveSite) -> None:
    upload_small_dataset(shared_site, "own-request")
    ds = shared_site.ds_client()
    asset = asset_of(ds, "own-request")
    submit_request(ds, asset, mean_self_approved, limit=1)
    own = next(r for r in ds.requests.get_all() if r.code.service_func_name == "mean_self_approved")
    outcome = None
    with pytest.raises(Exception):
        outcome = own.approve()
        if outcome is None or isinstance(outcome, sy.SyftError):
            raise RuntimeError("refused")
    users = None
    try:
        users = ds.users.get_all()
    except Exception:
        users = None
    assert users is None or isinstance(users, sy.SyftError) or [u.email for u in users] == [DS_EMAIL]
    row = next(r for r in requests_json(shared_site) if r["function"] == "mean_self_approved")
    assert row["status"] == "pending"


def test_restart_keeps_everything_and_two_sites_run_at_once(shared_site: LiveSite, tmp_path) -> None:
    site = start_site(tmp_path, "hospital-restart", allow_custom_code=True)
    try:
        assert site.config.port != shared_site.config.port
        assert json.loads(shared_site.setup("status", "--json").stdout)["answering"]
        upload_small_dataset(site, "persistent")
        ds = site.ds_client()
        asset = asset_of(ds, "persistent")
        submit_request(ds, asset, mean_persistent, limit=2)
        row = next(r for r in requests_json(site) if r["function"] == "mean_persistent")
        site.admin("approve", row["id"])
        first = run(ds, "mean_persistent", asset).get()
        verify_key = str(site.admin_client().metadata.verify_key)

        site.setup("down")
        assert not json.loads(site.setup("status", "--json", check=False).stdout)["running"]
        site.setup("up")

        admin = site.admin_client()
        assert str(admin.metadata.verify_key) == verify_key
        assert [d.name for d in admin.datasets.get_all()] == ["persistent"]
        assert DS_EMAIL in {u.email for u in admin.users.get_all()}
        row = next(r for r in requests_json(site) if r["function"] == "mean_persistent")
        assert (row["status"], row["runs_used"], row["runs_allowed"]) == ("approved", 1, 2)
        ds = site.ds_client()
        asset = asset_of(ds, "persistent")
        assert run(ds, "mean_persistent", asset).get() == first
        with pytest.raises(Exception, match="budget used up"):
            run(ds, "mean_persistent", asset)
    finally:
        site.setup("down", check=False)

"""Issue 13's red team, replayed as a data scientist against a live datasite behind the door.

Each attack used syft 0.9.5's own API with no request and no approval (or with a user-defined
policy). Before the door, `action.execute` ran numpy methods of the private asset inside the server
(`.tofile(path)` wrote the private image to a file), read data_dir/secrets/ and overwrote
privacy_budget.json. Now each is refused with one uniform message, nothing is written and no
value leaks, the audit log says who tried what, and afterwards the admin's tools and the normal
workflow still work. The site is shared with tests/test_server_door.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import syft as sy

from analyses.site_requests import call_site_task, request_site_task, request_status
from datasite_setup import server_door
from tests.conftest import DS_EMAIL, LiveSite
from tests.test_datasite_server import asset_of, requests_json
from tests.test_server_door import (  # noqa: F401  (door_site is a fixture)
    SECRET_DATASET,
    SECRET_OFFSET,
    audit_lines,
    door_site,
    is_refused,
    raw_call,
    refusals_since,
)


class CountingPolicy(sy.CustomOutputPolicy):
    """A user-defined output policy (the documented syft 0.9.5 shape). Its class body is what
    syft would run inside the server on approval; the door refuses the request at submission."""

    n_calls: int = 0
    downloadable_output_args: list[str] = []
    state: dict = {}

    def __init__(self, n_calls: int = 1, downloadable_output_args: list[str] | None = None) -> None:
        self.downloadable_output_args = downloadable_output_args if downloadable_output_args is not None else []
        self.n_calls = n_calls
        self.state = {"counts": 0}

    def public_state(self) -> int:
        return self.state["counts"]

    def update_policy(self, context, outputs) -> None:  # type: ignore[no-untyped-def]
        self.state["counts"] += 1

    def apply_to_output(self, context, outputs, update_policy=True):  # type: ignore[no-untyped-def]
        if hasattr(outputs, "syft_action_data"):
            outputs = outputs.syft_action_data
        if self.state["counts"] >= self.n_calls:
            return None
        if update_policy:
            self.update_policy(context, outputs)
        return {name: outputs[name] for name in self.downloadable_output_args}

    def _is_valid(self, context) -> bool:  # type: ignore[no-untyped-def]
        return self.state["counts"] < self.n_calls


def mean_with_custom_policy(cases):
    return {"mean": float(sum(c["image"].mean() for c in cases) / len(cases))}


def mean_by_admin_with_custom_policy(cases):
    return {"mean": float(sum(c["image"].mean() for c in cases) / len(cases))}


@pytest.fixture(scope="module")
def ds(door_site: LiveSite) -> Any:
    return door_site.ds_client()


@pytest.fixture(scope="module")
def secret(ds: Any) -> Any:
    return asset_of(ds, SECRET_DATASET)


def refused(exc: BaseException) -> bool:
    return server_door.REFUSAL in str(exc)


def _path_object(ds: Any, text: str) -> Any:
    """A string the data scientist uploads (allowed: her own plain object) to use as an argument."""
    from syft.service.action.action_object import ActionObject

    return ActionObject.from_obj(text).send(ds)


# --- the action service: pointers and methods of the private asset ---------------------------


def test_asset_pointer_is_refused(door_site: LiveSite, secret: Any) -> None:
    mark = len(audit_lines(door_site))
    with pytest.raises(Exception) as caught:
        _ = secret.pointer
    assert refused(caught.value)
    [entry] = refusals_since(door_site, mark)
    assert entry["service"] == "action.get_pointer" and entry["requested_by"] == DS_EMAIL
    assert f"(reference {entry['reference']})" in str(caught.value)  # what she quotes to the admin
    assert "get_pointer" not in str(caught.value) and "Traceback" not in str(caught.value)


@pytest.mark.parametrize("op, kind, with_arg", [
    ("tofile", "METHOD", True),        # the red team's exfiltration: private pixels into a file
    ("sum", "METHOD", False),
    ("__getitem__", "METHOD", True),
    ("fromfile", "FUNCTION", True),    # numpy.fromfile(<a server file>): secrets, audit.log, config
])
def test_methods_on_the_private_asset_never_run(door_site: LiveSite, ds: Any, secret: Any, tmp_path: Path,
                                                op: str, kind: str, with_arg: bool) -> None:
    from syft.service.action.action_object import Action, ActionType
    from syft.types.uid import LineageID

    target = tmp_path / f"leak-{op}.bin"
    argument = str(target) if op == "tofile" else str(door_site.config.secrets_dir / "server_identity.json")
    args = [LineageID(_path_object(ds, argument).id)] if with_arg else []
    action = Action(
        path="numpy" if kind == "FUNCTION" else "numpy.ndarray",
        op=op,
        remote_self=None if kind == "FUNCTION" else LineageID(secret.action_id),
        args=args,
        kwargs={},
        action_type=getattr(ActionType, kind),
    )
    mark = len(audit_lines(door_site))
    answer = raw_call(ds, "action.execute", action)
    assert is_refused(answer)
    assert not target.exists()
    [entry] = refusals_since(door_site, mark)
    assert entry["service"] == "action.execute" and entry["why"] == "not on the allow-list"
    with pytest.raises(Exception) as caught:  # syft's own client path says the same
        ds.api.services.action.execute(action)
    assert refused(caught.value)


def test_a_twin_upload_to_split_private_and_mock_arguments_is_refused(door_site: LiveSite, ds: Any, tmp_path: Path) -> None:
    """The trick that made `.tofile` write only the private side: a TwinObject argument."""
    from syft.service.action.action_object import ActionObject
    from syft.types.twin_object import TwinObject

    private, mock = ActionObject.from_obj(str(tmp_path / "p.bin")), ActionObject.from_obj(str(tmp_path / "m.bin"))
    private.syft_action_saved_to_blob_store = mock.syft_action_saved_to_blob_store = False
    mark = len(audit_lines(door_site))
    assert is_refused(raw_call(ds, "action.set", TwinObject(private_obj=private, mock_obj=mock)))
    assert "TwinObject" in refusals_since(door_site, mark)[0]["why"]


# --- reading private data directly -----------------------------------------------------------


def test_private_data_cannot_be_read(door_site: LiveSite, ds: Any, secret: Any) -> None:
    admin = door_site.admin_client()
    private = admin.api.services.action.get(secret.action_id)
    assert float(np.min(private.syft_action_data)) >= SECRET_OFFSET  # what must not leak
    private_blob = private.syft_blob_storage_entry_id
    assert private_blob is not None

    mark = len(audit_lines(door_site))
    data = secret.data
    assert data is None or isinstance(data, sy.SyftError)
    for answer in (
        raw_call(ds, "action.get", secret.action_id),
        raw_call(ds, "action.get", secret.action_id, twin_mode=None),
        raw_call(ds, "blob_storage.read", private_blob),
        raw_call(ds, "action.get_pointer", secret.action_id),
        raw_call(ds, "blob_storage.get_by_uid", private_blob),
        raw_call(ds, "dataset.get_by_action_id", secret.action_id),
    ):
        assert is_refused(answer), answer
    log = refusals_since(door_site, mark)
    assert {"action.get", "blob_storage.read", "action.get_pointer"} <= {e["service"] for e in log}
    read = next(e for e in log if e["service"] == "blob_storage.read")
    assert "not readable" in read["why"] and str(private_blob) in read["object"]
    assert float(np.max(np.asarray(secret.mock))) < 1.0  # the mock is still what she may see


def test_blob_storage_writes_reach_only_her_own_blobs(door_site: LiveSite, ds: Any, secret: Any) -> None:
    """syft checks only read permission before `write_to_disk`, and mocks are readable by all."""
    from syft.types.blob_storage import CreateBlobStorageEntry

    mock_blob = ds.api.services.action.get_mock(secret.action_id).syft_blob_storage_entry_id
    assert mock_blob is not None
    mark = len(audit_lines(door_site))
    assert is_refused(raw_call(ds, "blob_storage.write_to_disk", uid=mock_blob, data=b"overwritten"))
    escape = CreateBlobStorageEntry(file_size=10, extensions=["/../../secrets/server_identity.json"])
    assert is_refused(raw_call(ds, "blob_storage.allocate", escape))
    reuse = CreateBlobStorageEntry(id=mock_blob, file_size=10)
    assert is_refused(raw_call(ds, "blob_storage.allocate", reuse))
    whys = [e["why"] for e in refusals_since(door_site, mark)]
    assert "not allocated by this user" in whys[0] and "extensions" in whys[1] and "existing blob" in whys[2]
    assert float(np.max(np.asarray(asset_of(ds, SECRET_DATASET).mock))) < 1.0  # not overwritten


# --- requests: user-defined policies, approving her own --------------------------------------


def test_a_request_with_a_user_defined_policy_is_refused_at_submission(door_site: LiveSite, ds: Any) -> None:
    asset = asset_of(ds, "cohort")
    code = sy.syft_function(
        input_policy=sy.MixedInputPolicy(cases=asset, client=ds),
        output_policy=CountingPolicy(n_calls=1, downloadable_output_args=["mean"]),
    )(mean_with_custom_policy)
    mark = len(audit_lines(door_site))
    with pytest.raises(Exception) as caught:
        answer = ds.code.request_code_execution(code)
        if isinstance(answer, sy.SyftError):
            raise RuntimeError(answer.message)
    assert refused(caught.value)
    [entry] = refusals_since(door_site, mark)
    assert entry["service"] == "code.request_code_execution" and "user-defined CountingPolicy" in entry["why"]
    assert not any(r.code.service_func_name == "mean_with_custom_policy" for r in ds.requests.get_all())


def test_an_admin_can_still_submit_a_request_with_a_user_defined_policy(door_site: LiveSite) -> None:
    """Such a request can predate the door (or come from an admin, who is not behind it);
    `datasite-admin requests` crashed on it for every later request ('UserPolicy' object has no
    attribute '__name__'). Listed and shown by the CLIs in the last test."""
    admin = door_site.admin_client()
    asset = asset_of(admin, "cohort")
    code = sy.syft_function(
        input_policy=sy.MixedInputPolicy(cases=asset, client=admin),
        output_policy=CountingPolicy(n_calls=1, downloadable_output_args=["mean"]),
    )(mean_by_admin_with_custom_policy)
    answer = admin.code.request_code_execution(code)
    assert not isinstance(answer, sy.SyftError), answer


def test_a_data_scientist_cannot_approve_or_rewrite_her_own_request(door_site: LiveSite, ds: Any) -> None:
    asset = asset_of(ds, "cohort")
    request = request_site_task(ds, asset, "cohort_summary", "self_approved", max_runs=1)
    mark = len(audit_lines(door_site))
    for path, args in (
        ("request.apply", [request.id]),
        ("request.undo", [request.id, "no"]),
        ("code_status.update", []),
        ("request.submit", []),
        ("code.update", []),
        ("code.store_execution_output", []),
    ):
        assert is_refused(raw_call(ds, path, *args)), path
    assert {e["service"] for e in refusals_since(door_site, mark)} >= {"request.apply", "code_status.update"}
    assert request_status(ds, "cohort_summary", "self_approved") == "pending"
    with pytest.raises(Exception, match="(?i)approv"):
        call_site_task(ds, asset, "cohort_summary", "self_approved", {"group_by": "Manufacturer"})


def test_services_the_workflow_does_not_use_are_closed(door_site: LiveSite, ds: Any) -> None:
    """Worker pools, custom API endpoints, sync, projects, notifications, jobs, logs, users."""
    for path in ("worker_pool.create_pool_request", "worker_pool.get_all", "api.call", "api.view",
                 "project.create_project", "project.get_all", "notifications.get_all", "notifications.reply",
                 "job.get_all", "log.get_all", "user.update", "user.delete", "network.add_peer",
                 "code.submit", "output.get_all", "attestation.get_cpu_attestation", "metadata.get_env",
                 "settings.welcome_show", "sync.sync_items", "blob_storage.get_all"):
        assert is_refused(raw_call(ds, path)), path


# --- afterwards ------------------------------------------------------------------------------


def test_after_the_attacks_the_admin_tools_and_the_workflow_still_work(door_site: LiveSite, ds: Any) -> None:
    from datasite_setup import review

    rows = {r["function"]: r for r in requests_json(door_site)}  # `datasite-admin requests --json`
    custom = rows["mean_by_admin_with_custom_policy"]
    assert custom["output_policy"].startswith("user-defined CountingPolicy") and custom["runs_used"] == 0
    shown = door_site.admin("show", custom["id"], "--json", check=False)
    assert shown.returncode in (0, 4), shown.stderr  # 4 = high findings in the static audit
    assert '"kind": "custom code"' in shown.stdout
    approved = door_site.admin("approve", custom["id"], check=False)  # its class body would run in the server
    assert approved.returncode != 0 and "user-defined policy" in approved.stdout + approved.stderr
    assert rows["cohort_summary_self_approved"]["status"] == "pending"
    review.approve(door_site.config, door_site.admin_client(), rows["cohort_summary_self_approved"]["id"])
    asset = asset_of(ds, "cohort")
    summary = call_site_task(ds, asset, "cohort_summary", "self_approved", {"group_by": "Manufacturer"})
    assert summary["unknown"]["n"] == 3
    log = audit_lines(door_site)
    refusals = [e for e in log if e.get("action") == "refused-call"]
    assert refusals and all(e["requested_by"] == DS_EMAIL or e.get("role") == "GUEST" for e in refusals)

"""The server's door (datasite_setup/server_door.py) on a live datasite: what a data scientist's
session can call is exactly the documented allow-list, and the request workflow passes through it.

One datasite serves this module and tests/test_red_team_syft_api.py (site_pool key "door").
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import syft as sy

from analyses.site_requests import call_site_task, request_site_task, request_status
from datasite_setup import review, server_door
from tests.conftest import DS_EMAIL, LiveSite, start_site
from tests.test_datasite_server import asset_of, upload_small_dataset

# The documented allow-list (datasite_setup/server_door.py says why each entry is there); a change
# to it must be a deliberate change to this line too.
DOCUMENTED_ALLOW_LIST = {
    "user.get_current_user", "dataset.get_all", "action.get_mock", "metadata.get_metadata",
    "code.request_code_execution", "request.get_all", "code.get_all",
    "notifications.resolve_object", "migration._get_object",
    "action.set", "blob_storage.allocate", "blob_storage.write_to_disk",
    "code.call", "action.get", "action.has_storage_permission", "blob_storage.read",
}
SECRET_DATASET = "secret-image"
SECRET_OFFSET = 7000.0  # every private pixel is >= this; every mock pixel is < 1


def upload_secret_image(site: LiveSite) -> np.ndarray:
    """A private 'image' as one numpy asset, the shape the red team attacked; 2 MB of noise, so
    that both sides live in blob storage (the site keeps objects of >= 1 MB there)."""
    rng = np.random.default_rng(13)
    image = SECRET_OFFSET + 100.0 * rng.random((512, 512))
    dataset = sy.Dataset(name=SECRET_DATASET, description="one private image and its noise mock")
    dataset.add_asset(sy.Asset(name="image", data=image, mock=rng.random((512, 512))))
    assert not isinstance(site.admin_client().upload_dataset(dataset), sy.SyftError)
    return image


@pytest.fixture(scope="module")
def door_site(site_pool: dict[str, LiveSite], tmp_path_factory: pytest.TempPathFactory) -> LiveSite:
    """A site with the defaults a hospital gets, a cohort of small cases and a private image."""
    if "door" not in site_pool:
        site = start_site(tmp_path_factory.mktemp("door-site"), "hospital-door")
        site_pool["door"] = site
        upload_small_dataset(site, "cohort")
        upload_secret_image(site)
    return site_pool["door"]


@pytest.fixture(scope="module")
def ds(door_site: LiveSite) -> Any:
    return door_site.ds_client()


def raw_call(client: Any, path: str, *args: Any, blocking: bool = True, server_uid: Any = None, **kwargs: Any) -> Any:
    """Send one signed API call as `client`, exactly as a hand-made client could, bypassing syft's
    client-side checks and endpoint list; returns what the server answered."""
    from syft.client.api import SyftAPICall

    call = SyftAPICall(
        server_uid=server_uid or client.api.server_uid, path=path, args=list(args), kwargs=kwargs, blocking=blocking
    )
    return client.api.make_call(call)


def is_refused(answer: Any) -> bool:
    """The door's uniform answer: the same words every time, plus a reference into the audit log."""
    return isinstance(answer, sy.SyftError) and answer.message.startswith(server_door.REFUSAL + "; ")


def audit_lines(site: LiveSite) -> list[dict]:
    path = site.config.data_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def refusals_since(site: LiveSite, mark: int) -> list[dict]:
    return [e for e in audit_lines(site)[mark:] if e.get("action") == "refused-call"]


# --- the list itself -------------------------------------------------------------------------


def test_allow_list_is_documented_and_never_wider_than_syft_gives_a_data_scientist() -> None:
    from syft.service.service import ServiceConfigRegistry, UserServiceConfigRegistry
    from syft.service.user.user_roles import ServiceRole

    data_scientist = UserServiceConfigRegistry.from_role(ServiceRole.DATA_SCIENTIST).get_registered_configs()
    for path, entry in server_door.ALLOWED.items():
        assert path in ServiceConfigRegistry.get_registered_configs(), path
        assert path in data_scientist, f"{path} is not open to data scientists in syft itself"
        assert len(entry.why) > 40, f"{path}: say why it is there"
    assert set(server_door.ALLOWED) == DOCUMENTED_ALLOW_LIST
    assert len(data_scientist) == 114  # what syft 0.9.5 itself opens to the DATA_SCIENTIST role


def test_every_syft_service_method_is_refused_to_a_data_scientist_unless_allow_listed(door_site: LiveSite, ds: Any) -> None:
    """Call every service path syft 0.9.5 registers (admin-only ones too) as the data scientist,
    with no arguments: the door refuses exactly the paths outside the allow-list; an allow-listed
    path either runs or fails on its missing arguments, never 'not on the allow-list'."""
    from syft.service.service import ServiceConfigRegistry

    registered = set(ServiceConfigRegistry.get_registered_configs())
    exposed = {endpoint.service_path for endpoint in ds.api.endpoints.values()}
    exposed |= {endpoint.service_path for endpoint in (ds.api.lib_endpoints or {}).values()}
    assert exposed <= registered, exposed - registered  # so the registry covers every endpoint a DS is shown
    assert {"action.execute", "action.get_pointer", "blob_storage.read", "worker_pool.create_pool_request",
            "api.call", "project.create_project", "notifications.reply"} <= exposed

    mark = len(audit_lines(door_site))
    refused_answers = {path for path in sorted(registered) if is_refused(raw_call(ds, path))}
    log = refusals_since(door_site, mark)
    not_listed = {e["service"] for e in log if e["why"] == "not on the allow-list"}

    assert not_listed == registered - DOCUMENTED_ALLOW_LIST
    assert refused_answers >= not_listed
    for path in DOCUMENTED_ALLOW_LIST:
        reasons = {e["why"] for e in log if e["service"] == path}
        assert all(r.startswith("arguments do not match") for r in reasons), (path, reasons)
    assert all(e["requested_by"] == DS_EMAIL and e["role"] == "DATA_SCIENTIST" for e in log)
    print(f"\n{len(registered)} syft service paths; {len(registered - set(server_door.ALLOWED))} refused to a "
          f"data scientist, {len(server_door.ALLOWED)} allow-listed")


def test_queued_forwarded_and_guest_calls_are_refused_even_for_allowed_paths(door_site: LiveSite, ds: Any) -> None:
    from syft.client.api import SyftAPICall
    from syft.server.credentials import SyftSigningKey
    from syft.types.uid import UID

    mark = len(audit_lines(door_site))
    assert not is_refused(raw_call(ds, "dataset.get_all"))
    assert is_refused(raw_call(ds, "dataset.get_all", blocking=False))
    assert is_refused(raw_call(ds, "dataset.get_all", server_uid=UID()))
    assert is_refused(raw_call(ds, "queue", uid=UID()))  # syft's handler answers it before any role check
    stranger = SyftSigningKey.generate()
    call = SyftAPICall(server_uid=ds.api.server_uid, path="dataset.get_all", args=[], kwargs={}, blocking=True)
    from syft.client.api import debox_signed_syftapicall_response

    answer = debox_signed_syftapicall_response(ds.api.connection.make_call(call.sign(stranger))).unwrap()
    assert is_refused(answer)
    whys = [e["why"] for e in refusals_since(door_site, mark)]
    assert any("non-blocking" in w for w in whys) and any("another server" in w for w in whys)
    assert any("GUEST session" in w for w in whys)


# --- the workflow passes the door ------------------------------------------------------------


def test_the_request_workflow_passes_the_door_without_a_single_refusal(door_site: LiveSite, ds: Any) -> None:
    mark = len(audit_lines(door_site))
    asset = asset_of(ds, "cohort")
    assert [m["case_id"] for m in asset.mock] == ["mock-0", "mock-1", "mock-2"]
    request_site_task(ds, asset, "cohort_summary", "through_door", max_runs=2)
    assert request_status(ds, "cohort_summary", "through_door") == "pending"
    config, admin = door_site.config, door_site.admin_client()  # the CLIs: tests/test_red_team_syft_api.py
    pending = review.list_requests(config, admin, status="pending")
    review.approve(config, admin, next(r.id for r in pending if r.function == "cohort_summary_through_door"))
    assert request_status(ds, "cohort_summary", "through_door") == "approved"

    summary = call_site_task(ds, asset, "cohort_summary", "through_door", {"group_by": "Manufacturer"})
    assert summary["unknown"]["n"] == 3
    assert refusals_since(door_site, mark) == []


def test_parameters_and_results_of_a_megabyte_and_more_go_through_blob_storage(door_site: LiveSite, ds: Any) -> None:
    """>= 1 MB (model weights) travels via blob_storage.allocate / write_to_disk / read."""
    from syft.service.action.action_object import ActionObject

    mark = len(audit_lines(door_site))
    weights = np.random.default_rng(0).random(300_000)
    sent = ActionObject.from_obj(weights).send(ds)
    assert sent.syft_blob_storage_entry_id is not None  # it did go to blob storage
    back = ds.api.services.action.get(sent.id)
    assert np.array_equal(back.syft_action_data, weights)
    assert refusals_since(door_site, mark) == []



def test_a_calls_text_in_syfts_log_names_no_argument_value(tmp_path: Any) -> None:
    """syft formats every call into a log line whatever the log level; with the door installed
    that text names the path and argument names, never a value (private data, or a weight dict
    whose text alone cost a large part of a training round); an array's text in the site server
    (which syft builds and stores for every object it validates) is its shape and type."""
    from types import SimpleNamespace

    from syft.client.api import SyftAPICall
    from syft.types.uid import UID

    server = SimpleNamespace(handle_api_call_with_unsigned_result=lambda *a, **k: None,
                             get_role_for_credentials=lambda credentials: None)
    try:
        server_door.install(server, tmp_path)
        call = SyftAPICall(server_uid=UID(), path="code.call", args=[np.arange(4242.0)], kwargs={"weights": np.full(3, 7.5)})
        text = f"API Call: {call}"
        array_texts = repr(np.arange(100.0)), str(np.full((2, 3), 7.5, np.float32))
    finally:
        np.set_string_function(None, repr=True)
        np.set_string_function(None, repr=False)
    assert "code.call" in text and "weights" in text
    assert "4241" not in text and "7.5" not in text
    assert array_texts == ("array(shape=(100,), dtype=float64)", "array(shape=(2, 3), dtype=float32)")


def test_the_data_scientists_arrays_print_by_shape_only_while_her_calls_run() -> None:
    """In her process numpy's own texts are hers: shape-only texts last as long as the calls."""
    from datasite_setup.array_texts import arrays_printed_by_shape

    values = np.array([1.5, 2.5])
    with arrays_printed_by_shape():
        with arrays_printed_by_shape():
            inner = repr(values)
        still_in_a_call = str(values)
    assert inner == "array(shape=(2,), dtype=float64)" and still_in_a_call == inner
    assert repr(values) == "array([1.5, 2.5])" and str(values) == "[1.5 2.5]"

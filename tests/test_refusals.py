"""Refusals: the data scientist gets one message whatever went wrong with the data; the admin
gets the real reason (exception type and message, contract rule, limit) in the audit log and in
`datasite-admin show`, under the reference the message quotes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import syft as sy
from syft.service.policy.policy import OutputPolicyExecuteCount

from datasite_setup import review
from datasite_setup.site_config import load_site_config
from tests.conftest import DS_EMAIL, LiveSite, write_site_config
from tests.test_datasite_server import asset_of, upload_small_dataset

WITHHELD = re.compile(
    r"custom code did not complete at the site with a result it can release; "
    r"the site's admin can see why \(reference ([0-9a-f]{8})\)"
)


def raises_with_data(cases):
    raise ValueError("first pixel is " + str(float(cases[0]["image"][0, 0, 0])))


def raises_other_type(cases):
    return {"ratio": float(cases[0]["image"].sum()) / 0.0}


def breaks_contract(cases):
    return {"huge": 2**60 + len(cases)}


def reads_a_file(cases):
    return {"bytes": float(len(open("/etc/hostname").read()))}


def succeeds(cases):
    return {"n": len(cases), "mean": float(sum(c["image"].mean() for c in cases) / len(cases))}


@pytest.fixture(scope="module")
def people(shared_site: LiveSite) -> SimpleNamespace:
    """The data scientist's and the admin's clients, and the dataset the module's code reads."""
    upload_small_dataset(shared_site, "refusal-target")
    ds = shared_site.ds_client()
    return SimpleNamespace(ds=ds, asset=asset_of(ds, "refusal-target"), admin=shared_site.admin_client())


def submit_and_approve(site: LiveSite, people: SimpleNamespace, func, limit: int = 2) -> str:
    """Send `func` as custom code and approve it (the admin's Python API); return the request id."""
    code = sy.syft_function(
        input_policy=sy.MixedInputPolicy(cases=people.asset, client=people.ds),
        output_policy=OutputPolicyExecuteCount(limit=limit),
    )(func)
    assert not isinstance(people.ds.code.request_code_execution(code), sy.SyftError)
    pending = review.list_requests(site.config, people.admin, status="pending")
    request_id = next(r.id for r in pending if r.function == func.__name__)
    review.approve(site.config, people.admin, request_id)
    return request_id


def call(people: SimpleNamespace, name: str):
    """The data scientist's call: the released value, or the exception she sees."""
    try:
        result = getattr(people.ds.code, name)(cases=people.asset)
        if isinstance(result, sy.SyftError):
            raise RuntimeError(result.message)
        return result.get()
    except Exception as exc:  # what reaches the data scientist, whatever its class
        return exc


def admin_cli(capsys: pytest.CaptureFixture, site: LiveSite, *args: str) -> tuple[int, str, str]:
    """`datasite-admin` in this process (a process of its own costs seconds): (exit code, stdout, stderr)."""
    from datasite_setup.admin_cli import main

    capsys.readouterr()
    code = main(["--site", str(site.config_path), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def reference_of(refusal: Exception) -> str:
    found = WITHHELD.search(str(refusal))
    assert found, str(refusal)
    return found.group(1)


def test_every_data_dependent_refusal_reads_the_same_and_the_admin_sees_why(
    shared_site: LiveSite, people: SimpleNamespace, capsys: pytest.CaptureFixture
) -> None:
    funcs = [raises_with_data, raises_other_type, breaks_contract, reads_a_file]
    request_ids = {f.__name__: submit_and_approve(shared_site, people, f) for f in funcs}
    seen = {f.__name__: call(people, f.__name__) for f in funcs}

    references = {name: reference_of(refusal) for name, refusal in seen.items()}
    texts = {WITHHELD.sub("", str(refusal)) for refusal in seen.values()}
    assert len(texts) == 1, texts  # nothing but the reference differs
    for refusal in seen.values():
        message = str(refusal)
        assert "Error" not in message and "contract" not in message and "Traceback" not in message
        assert "first pixel" not in message

    by_reference = {e["reference"]: e for e in review.read_audit_log(shared_site.config) if "reference" in e}
    raised = by_reference[references["raises_with_data"]]
    assert raised["action"] == "refused-run" and raised["why"] == "the code raised ValueError", raised
    assert "ValueError: first pixel is" in raised["report"] and raised["requested_by"] == DS_EMAIL
    assert by_reference[references["raises_other_type"]]["why"] == "the code raised ZeroDivisionError"
    contract = by_reference[references["breaks_contract"]]
    assert contract["action"] == "refused-result" and "output contract" in contract["why"]
    assert "too large to be held exactly by a float" in contract["why"]
    assert "open" in by_reference[references["reads_a_file"]]["why"]

    one = json.loads(admin_cli(capsys, shared_site, "audit-log", "--reference", references["raises_with_data"], "--json")[1])
    assert one == [raised]

    shown = json.loads(admin_cli(capsys, shared_site, "show", request_ids["raises_with_data"], "--json")[1])
    assert [(r["action"], r["reference"]) for r in shown["runs"]] == [("refused-run", references["raises_with_data"])]
    assert "ValueError: first pixel is" in shown["runs"][0]["report"]
    assert shown["runs_used"] == 1  # a failed run counts
    text = admin_cli(capsys, shared_site, "show", request_ids["raises_with_data"])[1]
    assert f"refused-run (reference {references['raises_with_data']}): the code raised ValueError" in text


def test_a_released_run_is_listed_with_its_outcome_and_values_leave_as_floats(
    shared_site: LiveSite, people: SimpleNamespace
) -> None:
    request_id = submit_and_approve(shared_site, people, succeeds, limit=1)
    released = call(people, "succeeds")
    assert released["n"] == 3 and type(released["n"]) is float
    refused = call(people, "succeeds")
    assert "budget used up" in str(refused)  # decided from the request alone: it may say why
    shown = review.show_request(shared_site.config, people.admin, request_id).to_dict()
    assert [r["action"] for r in shown["runs"]] == ["ran", "refused-run-budget"]
    assert shown["runs"][1]["why"] == "run budget used up: 1 of 1 runs started"


def test_admin_cli_errors_are_json_with_json(shared_site: LiveSite, capsys: pytest.CaptureFixture) -> None:
    code, out, err = admin_cli(capsys, shared_site, "--json", "show", "feedbeef")
    assert code == 1 and out == ""
    assert json.loads(err) == {"error": "no code request with id 'feedbeef'; list them with: datasite-admin requests",
                               "command": "show"}


def unit_site_config(tmp_path: Path):
    path = write_site_config(tmp_path, "site-refusals", 8081, min_cohort=5, extra="[execution]\nfork_server = false\n")
    config = load_site_config(path)
    config.data_dir.mkdir(parents=True)
    return config


def test_a_failing_site_task_is_withheld_with_its_exception_in_the_audit_log(tmp_path: Path) -> None:
    """The task itself fails inside the child (cases without masks): the admin reads the exception."""
    from datasite_setup.site_execution import SiteRefusal, run_request
    from datasite_setup.thin_requests import CALL_NAME

    config = unit_site_config(tmp_path)
    code = SimpleNamespace(raw_code=f'def summary(cases, params):\n    return {CALL_NAME}("cohort_summary", cases, params)\n')
    cases = [{"case_id": f"case-{i}", "image": np.ones((2, 4, 4), np.float32), "spacing": [1.0, 1.0, 1.0],
              "metadata": {}} for i in range(6)]
    with pytest.raises(SiteRefusal) as refused:
        run_request(config, code, {"cases": cases, "params": {"group_by": "Manufacturer"}}, DS_EMAIL)
    message = str(refused.value)
    assert message.startswith("task cohort_summary did not complete at the site with a result it can release")
    assert "Error" not in message and "mask" not in message
    [entry] = review.read_audit_log(config, reference=message[-9:-1])
    assert entry["action"] == "refused-run" and entry["why"] == "the code raised KeyError", entry
    assert "KeyError: 'mask'" in entry["report"] and "cohort_summary.py" in entry["report"]

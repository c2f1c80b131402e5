"""Custom code's channel: a few named finite floats, under the literal names the static audit reads
(and the contract enforces); the audit follows each returned value back to the private input and
flags selections, encodings and unnamed values; `datasite-admin show` states how many values and
bits a run can carry; code whose results could never be released is not approvable."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import syft as sy
from syft.service.policy.policy import OutputPolicyExecuteCount

from datasite_setup import review
from datasite_setup.code_audit import audit_source
from datasite_setup.site_config import load_site_config
from tests.conftest import DS_EMAIL, LiveSite, write_site_config
from tests.test_datasite_server import asset_of, upload_small_dataset
from tests.test_refusals import admin_cli


def exfiltrate(cases):
    raw = cases[0]["image"].ravel()[:2768].astype("float32").tobytes()
    return {f"v{i:03d}": int.from_bytes(raw[i * 128:(i + 1) * 128], "little") for i in range(len(raw) // 128)}


def pixels_under_literal_names(cases):
    img = cases[0]["image"].ravel()
    return {"p0": float(img[0]), "p1": float(img[1])}


def bits_in_a_sum(cases):
    packed = 0.0
    for i, value in enumerate(cases[0]["image"].ravel()[:50]):
        packed += (int(value) & 1) << i
    return {"packed": float(packed)}


def branch_on_a_pixel(cases):
    if cases[0]["image"][0, 0, 0] > 100:
        bit = 1.0
    else:
        bit = 0.0
    return {"bit": bit}


def honest_statistics(cases):
    import numpy as np

    lesion_means = []
    for case in cases:
        lesion = case["image"][case["mask"] > 0]
        lesion_means.append(lesion.mean())
    return {
        "n": len(cases),
        "mean": float(sum(c["image"].mean() for c in cases) / len(cases)),
        "lesion_mean": float(np.mean(lesion_means)),
        "lesion_sd": float(np.std(lesion_means)),
    }


def one_case_statistic(cases):
    return {"first_mean": float(cases[0]["image"].mean())}


def long_name(cases):
    return {"a_name_far_longer_than_thirty_two_characters": float(len(cases))}


def scaled_by_own_parameter(cases, params):
    return {"scaled": float(params["scale"]) * float(len(cases))}


def seventeen_values(cases):
    m = float(len(cases))
    return {"a0": m, "a1": m, "a2": m, "a3": m, "a4": m, "a5": m, "a6": m, "a7": m, "a8": m, "a9": m,
            "b0": m, "b1": m, "b2": m, "b3": m, "b4": m, "b5": m, "b6": m}


def mean_and_n(cases):
    return {"n": len(cases), "mean": float(sum(c["image"].mean() for c in cases) / len(cases))}


def findings(func, private=None) -> list[tuple[str, str]]:
    return [(f.severity, f.message) for f in audit_source(inspect.getsource(func), private)]


def high(func, private=None) -> str:
    return " | ".join(message for severity, message in findings(func, private) if severity == "high")


def test_the_attack_that_carried_11072_bytes_is_flagged_at_review() -> None:
    flagged = high(exfiltrate)
    assert "returns something other than a dict literal" in flagged
    assert "without an aggregation" in flagged and "tobytes() at line 2" in flagged and "from_bytes() at line 3" in flagged


@pytest.mark.parametrize(
    ("func", "words"),
    [
        (pixels_under_literal_names, "returns 'p0' derived from the private input without an aggregation: image or mask data"),
        (bits_in_a_sum, "returns 'packed' built from the private input through bit operation & at line 4"),
        (branch_on_a_pixel, "returns 'bit' derived from the private input without an aggregation"),
        (long_name, "a name must be an identifier of at most 32 characters"),
    ],
)
def test_values_that_carry_data_rather_than_statistics_are_flagged(func, words: str) -> None:
    assert words in high(func)


def test_statistics_pass_and_a_one_case_statistic_is_a_warning() -> None:
    assert findings(honest_statistics) == []
    assert findings(one_case_statistic) == [
        ("warn", "returns 'first_mean' computed from a selection of the private input (indexing at line 2): "
                 "a statistic of one case or region")
    ]


def test_only_the_site_assets_are_private_inputs() -> None:
    assert findings(scaled_by_own_parameter, private={"cases"}) == []
    assert "'scaled' derived from the private input" in high(scaled_by_own_parameter)


def unit_config(tmp_path: Path):
    path = write_site_config(tmp_path, "site-channel", 8081, allow_custom_code=True, extra="[execution]\nfork_server = false\n")
    config = load_site_config(path)
    config.data_dir.mkdir(parents=True)
    return config


def test_the_contract_enforces_the_names_read_at_review(tmp_path: Path) -> None:
    """The code that runs returns a name its reviewed text does not: the run releases nothing."""
    from datasite_setup.site_execution import SiteRefusal, run_request

    config = unit_config(tmp_path)
    reviewed = 'def stats(cases):\n    return {"mean": 1.0}\n'
    running = 'def stats(cases):\n    return {"mean": 1.0, "leak": float(cases[0]["image"][0, 0, 0])}\n'
    code = SimpleNamespace(raw_code=reviewed, parsed_code=running, unique_func_name="stats")
    cases = [{"case_id": "case-0", "image": np.full((2, 2, 2), 7.0, np.float32)}]
    with pytest.raises(SiteRefusal, match="admin can see why"):
        run_request(config, code, {"cases": cases}, DS_EMAIL)
    [entry] = [e for e in review.read_audit_log(config) if e["action"] == "refused-result"]
    assert entry["why"] == "output contract: result has 1 undeclared entry (declared: 'mean')"
    assert run_request(config, SimpleNamespace(raw_code=reviewed, parsed_code=reviewed, unique_func_name="stats"),
                       {"cases": cases}, DS_EMAIL) == {"mean": 1.0}


@pytest.fixture(scope="module")
def channel_people(shared_site: LiveSite) -> SimpleNamespace:
    upload_small_dataset(shared_site, "channel-target")
    ds = shared_site.ds_client()
    return SimpleNamespace(ds=ds, asset=asset_of(ds, "channel-target"), admin=shared_site.admin_client())


def submit(people: SimpleNamespace, func, limit: int) -> None:
    code = sy.syft_function(
        input_policy=sy.MixedInputPolicy(cases=people.asset, client=people.ds),
        output_policy=OutputPolicyExecuteCount(limit=limit),
    )(func)
    assert not isinstance(people.ds.code.request_code_execution(code), sy.SyftError)


def pending_id(site: LiveSite, people: SimpleNamespace, name: str) -> str:
    return next(r.id for r in review.list_requests(site.config, people.admin, status="pending") if r.function == name)


def test_show_states_what_a_run_can_carry(shared_site: LiveSite, channel_people: SimpleNamespace) -> None:
    submit(channel_people, mean_and_n, limit=3)
    request_id = pending_id(shared_site, channel_people, "mean_and_n")
    shown = review.show_request(shared_site.config, channel_people.admin, request_id).to_dict()
    assert shown["output"] == {"names": ["mean", "n"], "names_readable": True, "values_per_run": 2,
                               "bits_per_run": 129, "runs_allowed": 3, "bits_total": 387}
    assert shown["findings"] == []
    review.approve(shared_site.config, channel_people.admin, request_id, max_runs=1)
    shown = review.show_request(shared_site.config, channel_people.admin, request_id).to_dict()
    assert (shown["output"]["runs_allowed"], shown["output"]["bits_total"]) == (1, 129)
    released = channel_people.ds.code.mean_and_n(cases=channel_people.asset).get()
    assert released["n"] == 3.0 and all(type(v) is float for v in released.values())


def test_code_whose_results_could_never_leave_is_not_approvable(
    shared_site: LiveSite, channel_people: SimpleNamespace, capsys: pytest.CaptureFixture
) -> None:
    submit(channel_people, exfiltrate, limit=1)
    submit(channel_people, seventeen_values, limit=1)
    exfiltrate_id = pending_id(shared_site, channel_people, "exfiltrate")

    code, out, _ = admin_cli(capsys, shared_site, "show", exfiltrate_id, "--json")
    assert code == 4
    detail = json.loads(out)
    assert detail["output"]["names"] == [] and not detail["output"]["names_readable"]
    assert detail["output"]["bits_per_run"] == 1

    code, _, err = admin_cli(capsys, shared_site, "--json", "approve", exfiltrate_id)
    assert code == 1 and "names are not string literals" in json.loads(err)["error"]
    with pytest.raises(Exception, match="at most 16 per run"):
        review.approve(shared_site.config, channel_people.admin, pending_id(shared_site, channel_people, "seventeen_values"))
    statuses = {r.function: r.status for r in review.list_requests(shared_site.config, channel_people.admin)}
    assert statuses["exfiltrate"] == statuses["seventeen_values"] == "pending"

"""The release ledger and the rules it applies (`datasite_setup.disclosure`), without a server."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from datasite_setup.disclosure import (
    CohortRecord, LedgerRefused, Policy, ReleaseLedger, ReleaseRefused, TaskDeclined, read_task_release,
)
from datasite_setup.disclosure.differencing import conflict
from datasite_setup.output_contracts import ContractViolation
from datasite_setup.site_config import SiteConfigError, load_site_config
from tests.conftest import write_site_config

WHO = "ds@uni.example"


def ids(*numbers: int) -> frozenset[str]:
    return frozenset(f"case-{i}" for i in numbers)


def records(quantity: str, *cohorts: frozenset[str]) -> list[CohortRecord]:
    return [CohortRecord((), quantity, cohort) for cohort in cohorts]


# ---- the rules ---------------------------------------------------------------------------------------


def test_a_cohort_differing_from_an_earlier_one_by_fewer_than_min_cohort_cases_is_refused() -> None:
    seven = ids(*range(7))
    assert "by 1 case" in conflict([seven], [ids(*range(6))], min_cohort=5)
    assert "by 4 case" in conflict([seven], [ids(*range(7), 100, 101, 102, 103)], min_cohort=5)
    assert "by 2 case" in conflict([seven], [ids(*range(1, 7), 100)], min_cohort=5)  # one out, one in


def test_identical_disjoint_or_widely_different_cohorts_are_allowed() -> None:
    seven = ids(*range(7))
    assert conflict([seven], [seven], min_cohort=5) is None
    assert conflict([seven], [ids(*range(100, 105))], min_cohort=5) is None
    assert conflict([seven], [ids(*range(12))], min_cohort=5) is None  # five cases more


def test_a_union_of_releases_that_isolates_a_suppressed_case_is_refused() -> None:
    """GE and Philips released, Toshiba (one case) suppressed; all cases released later: all - GE - Philips."""
    ge, philips = ids(*range(6)), ids(*range(6, 12))
    assert conflict([ge], [philips], min_cohort=5) is None
    assert "determines the values of a set of 1 case" in conflict([ge, philips], [ids(*range(13))], min_cohort=5)
    assert conflict([ge, philips], [ids(*range(12))], min_cohort=5) is None  # exactly the two groups: nothing new
    assert "determines" in conflict([], [ge, philips, ids(*range(13))], min_cohort=5)  # also within one release


def test_records_survive_a_restart_and_an_identical_release_writes_nothing(tmp_path: Path) -> None:
    path, salt = tmp_path / "release_ledger.json", b"s" * 32
    seven = ids(*range(7))
    assert ReleaseLedger(path, salt).record(WHO, records("lesion_volume", seven), min_cohort=5) == 1
    written = path.read_bytes()

    restarted = ReleaseLedger(path, salt)  # a new server process reads the same file
    assert restarted.record(WHO, records("lesion_volume", seven), min_cohort=5) == 0
    assert path.read_bytes() == written
    with pytest.raises(LedgerRefused, match="lesion_volume.*by 1 case"):
        restarted.record(WHO, records("lesion_volume", ids(*range(6))), min_cohort=5)
    assert path.read_bytes() == written  # a refusal records nothing

    assert restarted.record("other@uni.example", records("lesion_volume", ids(*range(6))), min_cohort=5) == 1
    assert restarted.record(WHO, records("lesion_mean_intensity", ids(*range(6))), min_cohort=5) == 1
    assert len(restarted.released(WHO, "lesion_volume")) == 1


def test_the_file_holds_salted_hashes_never_case_ids(tmp_path: Path) -> None:
    ledger = ReleaseLedger.at_site(tmp_path)
    ledger.record(WHO, records("q", ids(*range(5))), min_cohort=5)
    text = (tmp_path / "release_ledger.json").read_text()
    assert "case-" not in text
    content = json.loads(text)
    assert content["format"] == 1 and len(content["released"][WHO]["q"]) == 1
    salt = tmp_path / "secrets" / "release_ledger_salt"
    assert salt.stat().st_mode & 0o077 == 0
    assert ReleaseLedger.at_site(tmp_path).case_hash("case-1") == ledger.case_hash("case-1")  # same salt after restart
    assert ReleaseLedger(tmp_path / "other.json", b"t" * 32).case_hash("case-1") != ledger.case_hash("case-1")


def test_concurrent_runs_over_conflicting_cohorts_release_only_one(tmp_path: Path) -> None:
    """Sixteen runs, each leaving out a different case of twenty: any two differ by 2 cases."""
    path, salt = tmp_path / "release_ledger.json", b"s" * 32
    accepted: list[int] = []

    def run(left_out: int) -> None:
        try:
            ReleaseLedger(path, salt).record(WHO, records("q", ids(*(i for i in range(20) if i != left_out))), 5)
            accepted.append(left_out)
        except LedgerRefused:
            pass

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 1 and len(ReleaseLedger(path, salt).released(WHO, "q")) == 1
    assert not list(tmp_path.glob("*.tmp"))


# ---- what the task hands the parent ------------------------------------------------------------------


CASES = [{"case_id": f"case-{i}"} for i in range(6)]


def test_the_task_release_is_split_into_result_and_cohorts() -> None:
    payload = {"result": {"n": 6}, "cohorts": [[[], "cohort_summary", np.arange(6)], [["GE"], "lesion_volume", np.array([0, 2])]]}
    result, cohorts = read_task_release(payload, CASES)
    assert result == {"n": 6}
    assert cohorts[1] == CohortRecord(("GE",), "lesion_volume", frozenset({"case-0", "case-2"}))
    with pytest.raises(TaskDeclined, match="covariate"):
        read_task_release({"refused": "a covariate level is held by 1 case"}, CASES)


@pytest.mark.parametrize(
    "payload",
    [
        {"n": 6},
        {"result": {}, "cohorts": [[[], "q", [0, 1]]]},
        {"result": {}, "cohorts": [[[], "q", np.array([0, 6])]]},
        {"result": {}, "cohorts": [[[], "no spaces allowed", np.array([0])]]},
        {"result": {}, "cohorts": [[[1], "q", np.array([0])]]},
    ],
)
def test_a_malformed_task_release_is_a_contract_violation(payload: dict) -> None:
    with pytest.raises(ContractViolation):
        read_task_release(payload, CASES)


def test_a_case_without_an_id_cannot_be_released() -> None:
    with pytest.raises(ReleaseRefused, match="case_id"):
        read_task_release({"result": {}, "cohorts": [[[], "q", np.array([0])]]}, [{"image": None}])


# ---- the policy: filters chosen by the site -----------------------------------------------------------


def test_a_voxel_histogram_bin_from_fewer_than_min_cohort_cases_is_zeroed(tmp_path: Path) -> None:
    """Bin 0 holds 400 voxels, all of one case: its count passes, its cohort does not."""
    result = {"n": 5, "intensity": {"n": 5, "counts": np.array([400, 900, 0], np.int64)}}
    bins = [CohortRecord(("intensity", "counts", "0"), "v/bins", ids(3)),
            CohortRecord(("intensity", "counts", "1"), "v/bins", ids(*range(5)))]
    protected, released = Policy(min_cohort=3).protect(result, {}, bins)
    assert protected["intensity"]["counts"].tolist() == [0, 900, 0] and released.zeroed_bins == 1


def test_only_released_parts_are_recorded_and_a_site_may_go_without_the_ledger(tmp_path: Path) -> None:
    policy = Policy.for_site(5, ("min_count", "release_ledger"), tmp_path)
    result, released = policy.protect({"GE": {"n": 7}, "Optima": {"n": 1}}, {}, [])
    cohorts = [CohortRecord(("GE",), "q", ids(*range(7))), CohortRecord(("Optima",), "q", ids(7)),
               CohortRecord(("GE",), None, ids(0))]  # contributors to voxels: not a release of a quantity
    policy.record(WHO, result, cohorts, released)
    assert released.ledger_new_cohorts == 1 and released.suppressed_groups == 1
    assert policy.ledger.released(WHO, "q") == [frozenset(policy.ledger.case_hash(c) for c in ids(*range(7)))]

    without = Policy.for_site(5, ("min_count",), tmp_path / "other")
    without.record(WHO, {"GE": {"n": 6}}, [CohortRecord(("GE",), "q", ids(*range(6)))], released)
    assert without.ledger is None and not (tmp_path / "other" / "release_ledger.json").exists()


def test_site_config_reads_and_checks_min_batch_and_filters(tmp_path: Path) -> None:
    privacy = load_site_config(write_site_config(tmp_path / "a", "site-a", 8081)).privacy
    assert privacy.min_batch == 8 and privacy.filters == ("min_count", "noise", "histogram_bins", "release_ledger")
    custom = write_site_config(tmp_path / "b", "site-b", 8081, extra='min_batch = 16\nfilters = ["release_ledger", "min_count"]\n')
    privacy = load_site_config(custom).privacy
    assert privacy.min_batch == 16 and privacy.filters == ("min_count", "release_ledger")  # the fixed order
    for bad, key in (("min_batch = 0", "min_batch"), ('filters = ["k_anonymity"]', "unknown filter"), ('filters = "all"', "filters")):
        with pytest.raises(SiteConfigError, match=key):
            load_site_config(write_site_config(tmp_path / "c", "site-c", 8081, extra=bad + "\n"))

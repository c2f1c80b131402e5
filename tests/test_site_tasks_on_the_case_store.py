"""Every installed site task gives the same answer on cases read lazily from the case store as on
the same cases held in memory: the store can replace the in-memory asset without a task changing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from datasite_setup.case_store import CaseSource, CaseStore
from datasite_setup.model_weights import exchanged_weights
from datasite_setup.site_tasks import TASKS, run_for_parent, run_installed_task
from domains import get_domain
from tests.test_federation_strategies import phantom_cases
from tests.test_radiomics_features import SETTINGS


@pytest.fixture(scope="module")
def cases_both_ways(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], CaseSource]:
    cases = phantom_cases("hospital-a", 5, seed=3, slices=6, matrix=32)
    store = CaseStore(tmp_path_factory.mktemp("site-data"))
    version = store.new_version()
    for i, case in enumerate(cases):
        case["split"] = "train" if i < 3 else "test"
        store.put(case, patient=f"p{i}", split=case["split"], version=version)
    return cases, CaseSource(store.root, [e.to_dict() for e in store.manifest()])


def _same(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, (np.ndarray, float, int)) and not isinstance(a, bool):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    else:
        assert a == b


@pytest.mark.parametrize("task, params", [
    ("cohort_summary", {"group_by": "Manufacturer"}),
    ("intensity_landmarks", {}),
    ("radiomics_aggregates", {"settings": SETTINGS}),
])
def test_aggregate_tasks_agree(cases_both_ways, task: str, params: dict[str, Any]) -> None:
    in_memory, lazy = cases_both_ways
    _same(run_installed_task(task, in_memory, params, min_cohort=2), run_installed_task(task, lazy, params, min_cohort=2))


def test_training_and_evaluation_agree(cases_both_ways) -> None:
    in_memory, lazy = cases_both_ways
    domain = get_domain("brain_mr_segmentation")
    torch.manual_seed(0)
    weights = exchanged_weights(domain.build_model())
    params = {"domain": domain.name, "weights": weights, "epochs": 1, "batch_size": 8, "lr": 1e-3,
              "optimizer": "adam", "seed": 1, "max_steps": 2}
    trained = [run_installed_task("local_train", cases, params, min_cohort=2) for cases in (in_memory, lazy)]
    for result in trained:
        assert result["scalars"].pop("compute_seconds") >= 0  # a timing, the one value allowed to differ
    _same(*trained)
    scores = {"domain": domain.name, "weights": weights}
    held_out = run_installed_task("evaluate", lazy, scores, min_cohort=2)
    _same(run_installed_task("evaluate", in_memory, scores, min_cohort=2), held_out)
    assert held_out["n_cases"] == 2.0  # evaluation defaults to the test split
    assert run_installed_task("evaluate", lazy, {**scores, "split": "all"}, min_cohort=2)["n_cases"] == 5.0


def test_a_run_on_one_split_reports_its_cohorts_in_the_site_case_positions(cases_both_ways) -> None:
    """The release ledger maps cohort positions to case ids over the whole manifest: a run on the
    test split must name the test cases' positions there, not their positions among themselves."""
    _, lazy = cases_both_ways
    payload = run_for_parent("cohort_summary", lazy, {"group_by": "Manufacturer", "split": "test"}, min_cohort=2, min_batch=1)
    path, quantity, whole = payload["cohorts"][0]
    assert (path, quantity, list(whole)) == ([], "cohort_summary", [3, 4])
    assert all(set(positions) <= {3, 4} for _, _, positions in payload["cohorts"])
    assert run_for_parent("cohort_summary", lazy, {"group_by": "Manufacturer", "split": "validation"}, min_cohort=2,
                          min_batch=1) == {"refused": "0 cases in split 'validation' is below the site's minimum cohort of 2"}
    assert TASKS["cohort_summary"].problems({"group_by": "Manufacturer", "split": "holdout"}) == [
        "parameter 'split' must be one of train, validation, test, unlabelled, train+unlabelled, all, got 'holdout'"]

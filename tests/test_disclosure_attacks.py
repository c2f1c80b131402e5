"""The attacks of issue 13, replayed: each worked against a live datasite before the release ledger.

(a) cohort_summary: two groups differing by one case give that case's lesion values; a group of
    five cases of which one has a lesion released that lesion's intensity.
(b) radiomics_aggregates: bisecting `minimumROISize` left one case out of a second run.
(c) combat_statistics: a covariate level held by one case put that case's features into X'Y.
(d) local_train: batch_size 1, max_steps 1, lr 1 turned the update into one slice's label.

Later release paths are attacked the same way: FedMA's model widths, and teacher-student training
(a `teacher` of the data scientist's choosing labels the site's unlabelled cases; nothing about
them but their count may leave, and no split evaluates a pseudo-label).

The task-level rules run in-process; the attacks run against one live datasite (minimum cohort 5)
shared by the module, holding eight small cases and a re-upload of seven of them.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np
import pytest
import syft as sy

from analyses.site_requests import call_site_task, request_site_task
from datasite_setup.disclosure import Policy
from datasite_setup.site_tasks import TASKS, SiteFacts, TaskRefusal, run_installed_task
from datasite_setup.site_tasks.local_train import steps_of_at_least
from tests.conftest import LiveSite, start_site
from tests.test_datasite_server import asset_of
from tests.test_radiomics_features import SETTINGS, make_case

MIN_COHORT = 5
WITHHELD = "did not complete at the site with a result it can release"


# ---- in-process: what each task now counts and refuses ----------------------------------------------


def test_a_group_counts_the_cases_whose_values_it_averages() -> None:
    """Five GE cases, one with a lesion: the lesion statistics rest on one case, so n is 1."""
    cases = [make_case(i, lesion=i == 0) for i in range(5)]
    summary = run_installed_task("cohort_summary", cases, {"group_by": "Manufacturer"}, min_cohort=MIN_COHORT)
    assert summary["GE"]["n"] == 1
    protected, released = Policy(min_cohort=MIN_COHORT).protect(summary, {}, [])
    assert protected == {} and released.suppressed_groups == 1


def test_every_training_step_averages_at_least_min_batch_samples() -> None:
    import torch

    def batches(*sizes: int) -> list[tuple[Any, Any]]:
        return [(torch.zeros(n, 1), torch.zeros(n, 1)) for n in sizes]

    assert [len(x) for x, _ in steps_of_at_least(batches(8, 8, 3), 8)] == [8, 11]
    assert [len(x) for x, _ in steps_of_at_least(batches(8, 8, 3), 1)] == [8, 8, 3]
    with pytest.raises(TaskRefusal, match="5 training samples at this site, fewer than its minimum of 8"):
        list(steps_of_at_least(batches(5), 8))

    params = {"domain": "brain_mr_segmentation", "weights": {}, "epochs": 1, "batch_size": 1, "lr": 1.0,
              "optimizer": "sgd", "seed": 0, "max_steps": 1}
    task = TASKS["local_train"]
    assert task.problems(params) == []  # without a site: in-process simulation has no minimum
    assert task.problems(params, SiteFacts(min_cohort=5, min_batch=8)) == [
        "batch_size 1 is below this site's minimum of 8 samples per step"]
    assert task.problems({**params, "batch_size": 8}, SiteFacts(min_cohort=5, min_batch=8)) == []


# ---- against a live datasite ------------------------------------------------------------------------


def scanner_cases() -> list[dict[str, Any]]:
    """Eight GE cases, seven on a Signa and one on an Optima; one woman, seven men; every case has a lesion."""
    cases = []
    for i in range(8):
        case = make_case(i)
        case["case_id"] = f"case-{i:02d}"
        case["metadata"] = {**case["metadata"], "ManufacturerModelName": "Optima" if i == 7 else "Signa",
                            "PatientSex": "F" if i == 0 else "M"}
        cases.append(case)
    return cases


def upload(site: LiveSite, name: str, cases: list[dict[str, Any]]) -> None:
    mock = [{**case, "case_id": f"mock-{i}", "image": np.zeros_like(case["image"]), "mask": np.zeros_like(case["mask"])}
            for i, case in enumerate(cases)]
    dataset = sy.Dataset(name=name, description="small synthetic lesions")
    dataset.add_asset(sy.Asset(name="cases", data=cases, mock=mock))
    assert not isinstance(site.admin_client().upload_dataset(dataset), sy.SyftError)


def upload_partly_labelled(site: LiveSite, name: str, cases: list[dict[str, Any]], labelled: int) -> None:
    """`cases` as a training split whose first `labelled` cases carry masks; the others are
    unlabelled (no mask), as scans nobody has contoured yet."""
    private = [{**case, "split": "train"} if i < labelled else
               {**{k: v for k, v in case.items() if k != "mask"}, "split": "train", "labelled": False}
               for i, case in enumerate(cases)]
    mock = [{**case, "case_id": f"mock-{i}", "image": np.zeros_like(case["image"]),
             **({"mask": np.zeros_like(case["mask"])} if "mask" in case else {})} for i, case in enumerate(private)]
    dataset = sy.Dataset(name=name, description="a training split, mostly not contoured")
    dataset.add_asset(sy.Asset(name="cases", data=private, mock=mock))
    assert not isinstance(site.admin_client().upload_dataset(dataset), sy.SyftError)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSite]:
    live = start_site(tmp_path_factory.mktemp("ledger-site"), "hospital-ledger", min_cohort=MIN_COHORT)
    try:
        upload(live, "scanners", scanner_cases())
        upload(live, "scanners-v2", scanner_cases()[1:])  # the same study re-uploaded with one case withdrawn
        upload_partly_labelled(live, "partly-labelled", scanner_cases(), labelled=3)
        yield live
    finally:
        live.setup("down", check=False)


def approved(site: LiveSite, dataset: str, task: str, label: str, max_runs: int) -> tuple[Any, Any]:
    """(data scientist's client, asset) with the thin request for `task` sent and approved."""
    from datasite_setup import review

    ds = site.ds_client()
    asset = asset_of(ds, dataset)
    request_site_task(ds, asset, task, label, max_runs=max_runs)
    admin = site.admin_client()
    for request in review.list_requests(site.config, admin, status="pending"):
        review.approve(site.config, admin, request.id)
    return ds, asset


def audit(site: LiveSite, action: str) -> list[dict[str, Any]]:
    lines = (site.config.data_dir / "audit.log").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if entry.get("action") == action]


def refused_release(site: LiveSite, call: Any) -> str:
    """Run `call`, expect the uniform refusal; return the admin's reason logged under its reference."""
    with pytest.raises(Exception, match=WITHHELD) as refused:
        call()
    message = str(refused.value)
    reference = message.rsplit("reference ", 1)[1].rstrip(")").strip()
    entry = next(e for e in audit(site, "refused-release") if e["reference"] == reference)
    return entry["why"]


def test_a_group_differing_by_one_case_from_an_earlier_one_is_refused_and_a_repeat_is_not(site: LiveSite) -> None:
    ds, asset = approved(site, "scanners", "cohort_summary", "ledger", max_runs=4)
    by_vendor = call_site_task(ds, asset, "cohort_summary", "ledger", {"group_by": "Manufacturer"})
    assert by_vendor["GE"]["n"] == 8

    # Signa is GE without the one Optima case: 8 x mean(GE) - 7 x mean(Signa) would be that case.
    why = refused_release(site, lambda: call_site_task(ds, asset, "cohort_summary", "ledger",
                                                        {"group_by": "ManufacturerModelName"}))
    assert "by 1 case" in why

    again = call_site_task(ds, asset, "cohort_summary", "ledger", {"group_by": "Manufacturer"})
    assert again == by_vendor  # the honest analysis, repeated: same cohort, same answer


def test_roi_size_bisection_is_refused_and_so_is_a_re_upload_with_one_case_less(site: LiveSite) -> None:
    ds, asset = approved(site, "scanners", "radiomics_aggregates", "ledger", max_runs=2)
    with pytest.raises(Exception, match="parameters refused.*minimumROISize"):
        call_site_task(ds, asset, "radiomics_aggregates", "ledger", {"settings": {**SETTINGS, "setting": {"minimumROISize": 400}}})

    honest = call_site_task(ds, asset, "radiomics_aggregates", "ledger", {"settings": SETTINGS})
    assert honest["n"] == 8 and len(honest["features"]) > 25

    ds, withdrawn = approved(site, "scanners-v2", "radiomics_aggregates", "v2", max_runs=1)
    why = refused_release(site, lambda: call_site_task(ds, withdrawn, "radiomics_aggregates", "v2", {"settings": SETTINGS}))
    assert "by 1 case" in why


def test_a_covariate_level_held_by_one_case_is_refused(site: LiveSite) -> None:
    ds, asset = approved(site, "scanners", "combat_statistics", "ledger", max_runs=1)
    params = {"settings": SETTINGS, "features": ["original_firstorder_Mean"], "stage": "moments",
              "covariates": {"categorical": {"PatientSex": ["F", "M"]}}}
    why = refused_release(site, lambda: call_site_task(ds, asset, "combat_statistics", "ledger", params))
    assert "covariate level is held by fewer than 5" in why


def test_training_with_one_sample_per_step_is_refused_before_it_runs(site: LiveSite) -> None:
    ds, asset = approved(site, "scanners", "local_train", "ledger", max_runs=1)
    params = {"domain": "brain_mr_segmentation", "weights": {}, "epochs": 1, "batch_size": 1, "lr": 1.0,
              "optimizer": "sgd", "seed": 0, "max_steps": 1}
    with pytest.raises(Exception, match="batch_size 1 is below this site's minimum of 8 samples per step"):
        call_site_task(ds, asset, "local_train", "ledger", params)


def test_model_widths_outside_the_domain_s_range_or_for_a_fixed_model_are_refused_at_the_live_site(site: LiveSite) -> None:
    """FedMA's `widths` set the size of what a training run releases: a data scientist asking for a
    wider model than the domain declares, or widths for a domain with a fixed model, is refused
    before anything runs; widths that fit but weights that do not are withheld, uniformly."""
    from datasite_setup.model_weights import exchanged_weights
    from domains import get_domain

    ds, asset = approved(site, "scanners", "local_train", "widths", max_runs=3)
    domain = get_domain("mr_translation")
    base = {"domain": "mr_translation", "weights": exchanged_weights(domain.build_model()), "epochs": 1, "batch_size": 8,
            "lr": 1e-3, "optimizer": "adam", "seed": 0, "split": "all"}
    wide = {**domain.max_widths, "bottleneck": 10 * domain.max_widths["bottleneck"]}
    with pytest.raises(Exception, match=r"widths\['bottleneck'\] = 480 is outside 32-48"):
        call_site_task(ds, asset, "local_train", "widths", {**base, "widths": wide})
    with pytest.raises(Exception, match="domain brain_mr_segmentation has a fixed model; it takes no widths"):
        call_site_task(ds, asset, "local_train", "widths", {**base, "domain": "brain_mr_segmentation", "widths": wide})
    with pytest.raises(Exception, match=WITHHELD) as withheld:  # base-sized weights for a grown model: the run fails
        call_site_task(ds, asset, "local_train", "widths", {**base, "widths": dict(domain.max_widths)})
    reference = str(withheld.value).rsplit("reference ", 1)[1].rstrip(")").strip()
    (entry,) = [e for e in audit(site, "refused-run") if e["reference"] == reference]
    assert entry["widths"] == dict(domain.max_widths) and "has shape" in json.dumps(entry)
    assert not any(e.get("widths") == wide for e in audit(site, "ran"))


def test_teacher_student_releases_weights_and_a_count_and_no_split_scores_a_pseudo_label(site: LiveSite) -> None:
    """A teacher labels the unlabelled cases inside the run: the release is the student's weights
    and the counts (how many cases were pseudo-labelled), never a pseudo-label or a value derived
    from one alone. A teacher is refused outside a teacher-student split and when it does not fit
    the model (the key named, no value); evaluating on the unlabelled cases - the only place a
    pseudo-label could be scored - fails, uniformly, since they have no expert mask."""
    from datasite_setup.model_weights import exchanged_weights
    from domains import get_domain

    ds, asset = approved(site, "partly-labelled", "local_train", "semi", max_runs=3)
    model = get_domain("brain_mr_segmentation").build_model()
    weights = exchanged_weights(model)
    params = {"domain": "brain_mr_segmentation", "weights": weights, "epochs": 1, "batch_size": 8, "lr": 1e-3,
              "optimizer": "adam", "seed": 0, "max_steps": 2, "split": "train+unlabelled", "teacher": weights}
    with pytest.raises(Exception, match="a teacher labels unlabelled cases; it is taken with split train\+unlabelled only"):
        call_site_task(ds, asset, "local_train", "semi", {**params, "split": "train"})
    name = next(iter(weights))
    with pytest.raises(Exception, match=f"teacher\['{name}'\] has shape \(1,\)"):
        call_site_task(ds, asset, "local_train", "semi", {**params, "teacher": {**weights, name: np.zeros(1, np.float32)}})

    result = call_site_task(ds, asset, "local_train", "semi", params)
    assert set(result) == {"weights", "scalars"} and set(result["weights"]) == set(weights)
    assert all(result["weights"][k].shape == weights[k].shape for k in weights)
    assert set(result["scalars"]) == {"n_samples", "train_loss", "steps", "compute_seconds", "pseudo_labelled_cases"}
    assert result["scalars"]["pseudo_labelled_cases"] == 5.0

    ds, asset = approved(site, "partly-labelled", "evaluate", "semi", max_runs=1)
    with pytest.raises(Exception, match=WITHHELD) as withheld:
        call_site_task(ds, asset, "evaluate", "semi", {"domain": "brain_mr_segmentation", "weights": weights,
                                                        "split": "unlabelled"})
    assert "mask" not in str(withheld.value)
    reference = str(withheld.value).rsplit("reference ", 1)[1].rstrip(")").strip()
    (entry,) = [e for e in audit(site, "refused-run") if e["reference"] == reference]
    assert "mask" in json.dumps(entry)

"""Evaluations as a query channel on the labels, and the site's answer: `[privacy.evaluation_dp]`.

The attack: a body-size "model" that outputs the constant c for every frame makes the evaluation's
weight-error sum S(c) = sum_i |c - w_i|, whose slope in c is (#patients below c) - (#above). Two
evaluations a kilogram apart count the patients lighter than c; a sweep of c gives every patient's
weight. Nothing about cohorts sees it: every evaluation covers the same cohort. In process (what a
site without evaluation noise releases) the sweep recovers the weights; at a live site with
evaluation noise every evaluation's counts carry the calibrated Gaussian noise, each is charged to
the data scientist's budget (RDP-composed), the budget refuses further evaluations across a
restart, and a domain that does not bound what one case adds to its counts is refused there. Liver
CT and brain MR segmentation evaluations at a noised site release no voxel count.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator

import numpy as np
import pytest
import syft as sy
import torch

from analyses.site_requests import call_site_task
from datasite_setup.disclosure.evaluation_noise import EvaluationNoise
from datasite_setup.disclosure.update_accountant import composed_epsilon
from datasite_setup.site_tasks import run_installed_task
from domains.body_weight_height import DOMAIN, PROFILES, phantom_fleet
from domains.body_weight_height.metrics import EVALUATION_BOUNDS, FIXED_POINT
from domains.body_weight_height.model import standardised
from tests.conftest import LiveSite, start_site
from tests.test_datasite_server import asset_of
from tests.test_disclosure_attacks import approved

NOISE_MULTIPLIER, DELTA, EVALUATIONS = 0.2, 1e-5, 12  # little noise, so that it can be measured
BUDGET = composed_epsilon([(NOISE_MULTIPLIER, 1.0, EVALUATIONS)], DELTA) * 1.0001  # exactly EVALUATIONS fit
EVALUATION_DP = f"dp_epsilon_budget = {BUDGET!r}\n[privacy.evaluation_dp]\nnoise_multiplier = {NOISE_MULTIPLIER}\ndelta = {DELTA}\n"


def frames(n: int) -> list[dict[str, Any]]:
    profile = PROFILES["clinic-a"].with_size(96, 40)
    return [{**frame.as_record(f"frame-{i}"), "split": "test"} for i, frame in enumerate(phantom_fleet(profile, n, 4))]


def constant_model(weight_kg: float) -> dict[str, np.ndarray]:
    """Weights of a body-size model whose estimate is (weight_kg, 170 cm) for every frame."""
    torch.manual_seed(0)
    model = DOMAIN.build_model()
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    last = max(k for k in weights if k.startswith("head.") and k.endswith(".weight"))
    weights[last][:] = 0.0
    weights[last.replace("weight", "bias")][:] = standardised({"weight_kg": weight_kg, "height_cm": 170.0})
    return weights


def weight_error_sum(answer: dict[str, float]) -> float:
    return answer["weight_abs_error_micro"] / FIXED_POINT


def test_a_sweep_of_constant_models_gives_every_patient_s_weight_without_evaluation_noise() -> None:
    """S(c) = sum_i min(|c - w_i|, 30 kg) bends by +2 at each patient's weight (and by -1 where an
    error reaches the domain's clip): the bends of a 1 kg sweep locate every weight."""
    cases = frames(6)
    truth = sorted(case["labels"]["weight_kg"] for case in cases)
    grid = np.arange(40.0, 151.0, 1.0)  # adult weights
    sums = np.array([weight_error_sum(run_installed_task("evaluate", cases, {"domain": DOMAIN.name, "weights": constant_model(c),
                                                                              "split": "test"}, min_cohort=5)) for c in grid])
    bends = sums[2:] - 2 * sums[1:-1] + sums[:-2]
    found, cluster = [], []
    for c, bend in zip(grid[1:-1], bends):
        if bend > 0.2:
            cluster.append((c, bend))
        elif cluster:
            found.append(sum(c * b for c, b in cluster) / sum(b for _, b in cluster))
            cluster = []
    assert np.allclose(found, truth, atol=0.2)  # every weight, to 0.2 kg, from evaluations alone


@pytest.fixture(scope="module")
def noised_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSite]:
    live = start_site(tmp_path_factory.mktemp("evaluation-dp-site"), "clinic-evaluation-dp", extra=EVALUATION_DP)
    try:
        cases = frames(6)
        mock = [{**case, "case_id": f"mock-{i}", "image": np.zeros_like(case["image"]),
                 "labels": {name: 0.0 for name in case["labels"]}} for i, case in enumerate(cases)]
        dataset = sy.Dataset(name="frames", description="six depth frames with weight and height")
        dataset.add_asset(sy.Asset(name="cases", data=cases, mock=mock))
        assert not isinstance(live.admin_client().upload_dataset(dataset), sy.SyftError)
        yield live
    finally:
        live.setup("down", check=False)


def test_every_evaluation_leaves_noised_charged_and_refused_past_the_budget(noised_site: LiveSite) -> None:
    cases = frames(6)
    params = {"domain": DOMAIN.name, "weights": constant_model(80.0), "split": "test"}
    exact = run_installed_task("evaluate", cases, params, min_cohort=5)
    ds, asset = approved(noised_site, "frames", "evaluate", "noised", max_runs=EVALUATIONS + 2)
    answers = [call_site_task(ds, asset, "evaluate", "noised", params) for _ in range(EVALUATIONS)]

    sigma = NOISE_MULTIPLIER * math.sqrt(sum(bound > 0 for bound in EVALUATION_BOUNDS.values()))
    scaled = np.array([(a["weight_abs_error_micro"] - exact["weight_abs_error_micro"]) / EVALUATION_BOUNDS["weight_abs_error_micro"]
                       for a in answers])  # far enough from 0 not to be floored, fine enough not to be rounded
    assert 0.5 * sigma < scaled.std(ddof=1) < 1.6 * sigma and abs(scaled.mean()) < 3 * sigma / math.sqrt(EVALUATIONS)
    within = [f"{q}_within_{p}pct" for q in ("weight", "height") for p in (10, 20)]  # bound 1: noise SD 0.57 each
    assert all(a[key] == round(a[key]) >= 0 for a in answers for key in within)
    assert any(a[key] != exact[key] for a in answers for key in within)  # all 48 unchanged: chance below 1e-4
    assert all(a["n_cases"] == 6 and a["dp_noise_multiplier"] == NOISE_MULTIPLIER for a in answers)
    assert all(a["mae_kg"] == pytest.approx(max(0.0, round(a["weight_abs_error_micro"])) / FIXED_POINT / 6) for a in answers)
    # even this little noise (SD sigma x 30 kg = 17 kg per evaluation) drowns a sweep's bends of 2 kg per
    # patient: a second difference of three evaluations carries sqrt(6) x 17 = 42 kg of it
    assert np.std([a["weight_abs_error_micro"] for a in answers]) / FIXED_POINT * math.sqrt(6) > 10 * 2

    with pytest.raises(Exception, match="differential-privacy budget exhausted"):
        call_site_task(ds, asset, "evaluate", "noised", params)
    noised_site.setup("down")
    noised_site.setup("up")
    ds = noised_site.ds_client()
    with pytest.raises(Exception, match="differential-privacy budget exhausted"):
        call_site_task(ds, asset_of(ds, "frames"), "evaluate", "noised", params)
    log = [json.loads(line) for line in (noised_site.config.data_dir / "audit.log").read_text().splitlines()]
    charges = [e["action"] for e in log if e.get("evaluation_dp")]
    assert charges == ["charged-budget"] * EVALUATIONS + ["refused-budget"] * 2
    assert [e["evaluation_dp_epsilon"] > 0 for e in log if e.get("action") == "ran"] == [True] * EVALUATIONS


def test_a_domain_that_does_not_bound_one_case_s_contribution_is_refused_at_a_noised_site(noised_site: LiveSite) -> None:
    from datasite_setup.model_weights import exchanged_weights
    from domains import get_domain

    ds, asset = approved(noised_site, "frames", "evaluate", "unbounded", max_runs=1)
    weights = exchanged_weights(get_domain("mr_translation").build_model())
    with pytest.raises(Exception, match="does not bound what one case adds to its evaluation counts"):
        call_site_task(ds, asset, "evaluate", "unbounded", {"domain": "mr_translation", "weights": weights, "split": "test"})


def test_segmentation_evaluations_at_a_noised_site_release_no_voxel_count(tmp_path_factory: pytest.TempPathFactory) -> None:
    """What a curious data scientist would difference across evaluations, the voxel confusion counts
    (a whole liver, a whole tumour per case) and tumour burden's per-slice sums (a case's share
    grows with its slices), does not leave a noised site: liver CT's per-patient sums and brain MR's
    and tumour burden's per-case sums leave noised, the pooled metrics, brain MR's HD95 and the
    slice sums not at all, and each evaluation is charged to her budget."""
    from datasite_setup.model_weights import exchanged_weights
    from domains import get_domain
    from domains.brain_mr_segmentation.metrics import EVALUATION_BOUNDS as BRAIN_BOUNDS
    from domains.brain_mr_tumour_burden import EVALUATION_BOUNDS as BURDEN_BOUNDS
    from domains.liver_ct_segmentation.metrics import VOXEL_COUNT_KEYS
    from tests.test_radiomics_features import make_case

    cases = [{**make_case(i), "case_id": f"case-{i}", "split": "test"} for i in range(6)]
    live = start_site(tmp_path_factory.mktemp("segmentation-dp-site"), "clinic-segmentation-dp",
                      extra="dp_epsilon_budget = 50.0\n[privacy.evaluation_dp]\nnoise_multiplier = 1.0\n")
    answers, exact = {}, {}
    try:
        mock = [{**case, "case_id": f"mock-{i}", "image": np.zeros_like(case["image"]), "mask": np.zeros_like(case["mask"])}
                for i, case in enumerate(cases)]
        dataset = sy.Dataset(name="segmentations", description="six test cases with masks")
        dataset.add_asset(sy.Asset(name="cases", data=cases, mock=mock))
        assert not isinstance(live.admin_client().upload_dataset(dataset), sy.SyftError)
        for domain in ("liver_ct_segmentation", "brain_mr_segmentation", "brain_mr_tumour_burden"):
            ds, asset = approved(live, "segmentations", "evaluate", domain, max_runs=1)
            params = {"domain": domain, "weights": exchanged_weights(get_domain(domain).build_model()), "split": "test"}
            exact[domain] = run_installed_task("evaluate", cases, params, min_cohort=2)
            answers[domain] = call_site_task(ds, asset, "evaluate", domain, params)
        log = [json.loads(line) for line in (live.config.data_dir / "audit.log").read_text().splitlines()]
    finally:
        live.setup("down", check=False)
    liver, brain = answers["liver_ct_segmentation"], answers["brain_mr_segmentation"]
    assert not set(VOXEL_COUNT_KEYS) & set(liver) and set(VOXEL_COUNT_KEYS) <= set(exact["liver_ct_segmentation"])
    assert not [key for key in liver if key.endswith("_pooled")]
    assert liver["patients"] == 6 and liver["dp_noise_multiplier"] == 1.0 and 0.0 <= liver["liver_dice"] <= 1.0
    assert liver["liver_specificity_sum_ppm"] != exact["liver_ct_segmentation"]["liver_specificity_sum_ppm"]  # ~6e6, noise SD 3.3e6
    assert set(brain) == set(BRAIN_BOUNDS) | {"dice_per_case", "sensitivity_per_case", "specificity_per_case", "n_cases",
                                              "dp_noise_multiplier"}
    assert {"tp", "dice", "hd95_sum_um"} <= set(exact["brain_mr_segmentation"])
    assert brain["cases"] == brain["n_cases"] == 6 and 0.0 <= brain["dice_per_case"] <= 1.0
    assert brain["specificity_sum_ppm"] != exact["brain_mr_segmentation"]["specificity_sum_ppm"]
    burden = answers["brain_mr_tumour_burden"]
    assert set(burden) == set(BURDEN_BOUNDS) | {"mae_cm2_per_case", "rmse_cm2_per_case", "n_cases", "dp_noise_multiplier"}
    assert {"n_slices", "abs_error_micro", "rmse_cm2"} <= set(exact["brain_mr_tumour_burden"])
    assert burden["cases"] == 6 and burden["case_abs_error_micro"] != exact["brain_mr_tumour_burden"]["case_abs_error_micro"]
    assert [e["action"] for e in log if e.get("evaluation_dp")] == ["charged-budget"] * 3


def test_noise_is_scaled_per_count_by_what_one_case_adds_and_public_counts_leave_exact() -> None:
    counts = {"n_cases": 10, "a": 5_000, "b": 3}
    bounds = {"n_cases": 0.0, "a": 1_000.0, "b": 1.0}
    draws = [EvaluationNoise(2.0).protect(counts, bounds, lambda c: {"share": c["b"] / c["n_cases"]},
                                          np.random.default_rng(seed)) for seed in range(2000)]
    assert {d["n_cases"] for d in draws} == {10.0}
    sigma = 2.0 * math.sqrt(2)
    assert np.std([d["a"] for d in draws]) == pytest.approx(sigma * 1_000, rel=0.06)
    assert min(d["b"] for d in draws) == 0.0  # floored: a count is never negative
    assert all(d["share"] == d["b"] / 10 for d in draws)
    assert set(draws[0]) == {"n_cases", "a", "b", "share", "dp_noise_multiplier"}


def _liver_patients() -> list[dict[str, int]]:
    """Four patients' liver CT counts: three segmented perfectly, one with nothing predicted."""
    from domains.liver_ct_segmentation.metrics import case_counts

    truth = np.zeros((16, 32, 32), np.uint8)
    truth[4:12, 8:24, 8:24] = 1
    truth[6:9, 12:15, 12:15] = 2
    spacing = (4.0, 2.0, 2.0)
    return [case_counts(truth, truth, spacing) for _ in range(3)] + [case_counts(np.zeros_like(truth), truth, spacing)]


def test_a_liver_evaluation_leaves_per_patient_metrics_noised_and_voxel_counts_withheld() -> None:
    """Segmentation's voxel counts move by a whole liver per patient: noise that hid one would hide
    everything, so a noised site withholds them and releases the per-patient sums, detection and
    HD95 (each patient's capped), which one patient moves by at most 1 (or 100 mm)."""
    from domains.liver_ct_segmentation.metrics import (
        EVALUATION_BOUNDS as LIVER_BOUNDS, MAX_HD95_MM, VOXEL_COUNT_KEYS, add_counts, metrics_from_counts,
    )

    patients = _liver_patients()
    assert patients[-1]["liver_hd95_sum_um"] == MAX_HD95_MM * 1000  # the grid's diagonal, 111 mm, capped
    result = {**add_counts(*patients), "n_cases": 4}
    plain = metrics_from_counts(result)
    released = EvaluationNoise(1e-9).protect(result, LIVER_BOUNDS, metrics_from_counts, np.random.default_rng(0))
    assert not set(VOXEL_COUNT_KEYS) & set(released)
    assert not [key for key in released if key.endswith("_pooled")] and "liver_dice_pooled" in plain
    assert released["liver_dice"] == plain["liver_dice"] == pytest.approx(0.75)
    assert released["detection_sensitivity"] == plain["detection_sensitivity"] == pytest.approx(0.75)
    assert released["liver_hd95_mm"] == pytest.approx(MAX_HD95_MM / 4)
    sums = [EvaluationNoise(0.1).protect(result, LIVER_BOUNDS, metrics_from_counts, np.random.default_rng(seed))["liver_dice_sum_ppm"]
            for seed in range(1000)]
    assert np.std(sums) == pytest.approx(0.1 * math.sqrt(11) * 1e6, rel=0.08)  # 11 noised counts, bound 1 (in ppm) each


def test_the_orchestrator_pools_only_the_counts_every_site_released() -> None:
    from analyses.federation.pooled_metrics import pooled_metrics
    from domains import get_domain
    from domains.liver_ct_segmentation.metrics import EVALUATION_BOUNDS as LIVER_BOUNDS, add_counts, metrics_from_counts

    patients = _liver_patients()
    plain_site = {k: float(v) for k, v in {**add_counts(*patients[:2]), "n_cases": 2}.items()}
    plain_site.update(metrics_from_counts(add_counts(*patients[:2])))
    noised_site = EvaluationNoise(1e-9).protect({**add_counts(*patients[2:]), "n_cases": 2}, LIVER_BOUNDS, metrics_from_counts,
                                                np.random.default_rng(0))
    pooled = pooled_metrics(get_domain("liver_ct_segmentation"), {"a": plain_site, "b": noised_site})
    assert pooled["liver_dice"] == pytest.approx(0.75) and pooled["n_cases"] == 4
    assert "liver_dice_pooled" not in pooled


def test_the_site_config_reads_evaluation_privacy_and_one_delta_for_the_accountant(tmp_path) -> None:
    from datasite_setup.site_config import SiteConfigError, load_site_config
    from tests.conftest import write_site_config

    def config(extra: str) -> Any:
        return load_site_config(write_site_config(tmp_path, "site-eval-dp", 8081, extra=extra))

    assert config("[privacy.evaluation_dp]\nnoise_multiplier = 4\n").privacy.evaluation_dp == EvaluationNoise(4.0, 1e-5)
    both = "[privacy.update_dp]\nnoise_multiplier = 1\nclip_norm = 1\ndelta = 1e-6\n[privacy.evaluation_dp]\nnoise_multiplier = 4\n"
    with pytest.raises(SiteConfigError, match="'privacy.evaluation_dp.delta' must equal the training one"):
        config(both)
    with pytest.raises(SiteConfigError, match="missing key 'privacy.evaluation_dp.noise_multiplier'"):
        config("[privacy.evaluation_dp]\ndelta = 1e-5\n")
    assert config("").privacy.evaluation_dp is None


def test_a_tumour_burden_case_moves_its_released_sums_by_a_bound_whatever_its_slice_count() -> None:
    """Burden is scored per slice, so a case's share of the slice sums grows with its slices; a
    noised site releases instead each case's mean error over its slices, every slice's clipped at
    50 cm^2: a model 1,000 cm^2 off adds 50 cm^2 per case, whether the case has 10 slices or 40."""
    from domains import get_domain
    from domains.brain_mr_tumour_burden import EVALUATION_BOUNDS as BURDEN_BOUNDS, FIXED_POINT as MICRO, MAX_SLICE_ERROR_CM2
    from tests.test_radiomics_features import make_case

    domain = get_domain("brain_mr_tumour_burden")
    short = make_case(0)
    long = {**short, "case_id": "long", "image": np.tile(short["image"], (4, 1, 1)), "mask": np.tile(short["mask"], (4, 1, 1))}
    model = domain.build_model()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(1000.0)
    counts = domain.evaluation_counts(model, [short, long])
    assert counts["n_slices"] == 50 and counts["abs_error_micro"] > 49_000 * MICRO
    assert counts["cases"] == 2 and counts["case_abs_error_micro"] == 2 * MAX_SLICE_ERROR_CM2 * MICRO
    assert counts["case_sq_error_micro"] == 2 * MAX_SLICE_ERROR_CM2**2 * MICRO
    released = EvaluationNoise(1e-9).protect({**counts, "n_cases": 2}, BURDEN_BOUNDS, domain.metrics_from_counts,
                                             np.random.default_rng(0))
    assert set(released) == {*BURDEN_BOUNDS, "mae_cm2_per_case", "rmse_cm2_per_case", "n_cases", "dp_noise_multiplier"}
    assert released["mae_cm2_per_case"] == released["rmse_cm2_per_case"] == pytest.approx(MAX_SLICE_ERROR_CM2)
    inflated = {key: counts[key] * 10 if key != "cases" else counts[key] for key in BURDEN_BOUNDS}
    assert domain.metrics_from_counts(inflated)["mae_cm2_per_case"] == MAX_SLICE_ERROR_CM2  # a noised sum is capped
    with pytest.raises(KeyError, match="per-case sums"):
        domain.metrics_from_counts({"cases": 2})

"""The 3-D liver CT domain: preprocessing that inverts onto the case's grid, class-balanced patches,
per-patient and pooled metrics from additive counts, training that learns, and teacher-student runs
whose pseudo-labels stay at the site."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analyses.federation.orchestrator import TrainingPlan
from datasite_setup.site_tasks import TASKS, run_installed_task
from datasite_setup.site_tasks.case_selection import positions_in_split
from datasite_setup.site_tasks.pseudo_labels import pseudo_labelled
from domains import get_domain
from datasite_setup.site_tasks.task import SiteFacts
from domains.liver_ct_segmentation import DOMAIN, PatchSampling, largest_organ, preprocess_ct
from domains.liver_ct_segmentation.metrics import add_counts, case_counts, metrics_from_counts
from domains.liver_ct_segmentation.patches import case_patches

TEMPLATE = {"shape": (30, 72, 72), "spacing": [5.0, 4.5, 4.5], "origin": [-160.0, -160.0, 0.0],
            "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1], "metadata": {"Manufacturer": "X", "PatientWeight": 70.0}}


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return DOMAIN.mock_cases([TEMPLATE] * 6, seed=3)


def test_the_domain_is_registered_and_mock_cases_carry_no_patient_value(cases: list[dict]) -> None:
    assert get_domain("liver_ct_segmentation") is DOMAIN
    assert cases[0]["metadata"]["PatientWeight"] == ""
    assert set(np.unique(cases[0]["mask"])) == {0, 1, 2}
    assert cases[0]["image"].min() < -900 and 80 < np.median(cases[0]["image"][cases[0]["mask"] == 1]) < 140


def test_preprocessing_resamples_to_millimetres_windows_hu_and_inverts_onto_the_case_grid(cases: list[dict]) -> None:
    case = cases[0]
    processed = preprocess_ct(case)
    assert processed.spacing == pytest.approx((4.0, 4.0, 4.0))
    assert 0.0 <= processed.image.min() and processed.image.max() <= 1.0
    assert all(n >= m for n, m in zip(processed.image.shape, DOMAIN.preprocessing.min_shape))
    one_hot = np.stack([(processed.mask == k).astype(np.float32) for k in range(3)])
    back = processed.to_original_grid(one_hot)
    assert back.shape == (3, *case["image"].shape)
    labels = np.argmax(back, axis=0)
    liver, truth = labels >= 1, case["mask"] >= 1
    assert 2 * np.count_nonzero(liver & truth) / (liver.sum() + truth.sum()) > 0.93
    assert case["image"].dtype == np.float32 and case["image"].min() < -900  # the record is untouched


def test_patches_are_centred_on_the_classes_asked_for(cases: list[dict]) -> None:
    processed = preprocess_ct(cases[1])
    sampling = PatchSampling(patch_size=(16, 24, 24), patches_per_case=6, class_ratios=(0.0, 0.0, 1.0))
    images, labels = case_patches(processed, sampling, np.random.default_rng(0))
    assert images.shape == labels.shape == (6, 1, 16, 24, 24)
    assert all((patch == 2).any() for patch in labels)
    with pytest.raises(ValueError, match="multiple of 8"):
        PatchSampling(patch_size=(20, 24, 24))


def test_per_patient_means_and_pooled_metrics_come_from_additive_counts() -> None:
    truth_small = np.zeros((4, 10, 10), np.uint8)
    truth_small[1:3, 2:4, 2:4] = 1
    truth_large = np.zeros((4, 10, 10), np.uint8)
    truth_large[:, 1:9, 1:9] = 1
    truth_large[1:3, 4:7, 4:7] = 2  # 216 mm^3: a finding
    missed_small = np.zeros_like(truth_small)
    exact_large = truth_large.copy()
    spacing = (3.0, 2.0, 2.0)
    site_a = case_counts(missed_small, truth_small, spacing)
    site_b = case_counts(exact_large, truth_large, spacing)
    metrics = metrics_from_counts(add_counts(site_a, site_b))
    assert metrics["liver_dice"] == metrics["liver_f1"] == pytest.approx(0.5)  # one patient 0, one patient 1
    pooled = 2 * 256 / (2 * 256 + 8)
    assert metrics["liver_dice_pooled"] == pytest.approx(pooled)
    assert metrics["lesion_dice"] == pytest.approx(1.0)  # lesion-free patient left empty scores 1
    assert metrics["detection_sensitivity"] == 1.0 and metrics["detection_specificity"] == 1.0
    stray = np.zeros_like(truth_small)
    stray[0, 0, 0] = 2  # 12 mm^3: below a finding
    assert case_counts(stray, truth_small, spacing)["detection_fp"] == 0


def test_a_few_steps_of_3d_training_lower_the_loss_and_evaluation_fits_the_contract(cases: list[dict]) -> None:
    torch.manual_seed(0)
    model = DOMAIN.build_model()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(4):
        for x, y in DOMAIN.batches(cases[:4], 4, rng):
            assert x.shape[1:] == (1, 32, 48, 48)
            optimiser.zero_grad()
            loss = DOMAIN.loss(model(x), y)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    counts = DOMAIN.evaluation_counts(model, cases[4:])
    metrics = DOMAIN.metrics_from_counts(counts)
    assert set(counts) | set(metrics) <= DOMAIN.evaluation_scalars
    assert counts["patients"] == 2 and 0.0 <= metrics["liver_dice"] <= 1.0


def test_teacher_student_pseudo_labels_unlabelled_cases_at_the_site_and_returns_weights_only(cases: list[dict]) -> None:
    fleet = [dict(case, split="train") for case in cases[:4]]
    fleet[2] = {k: v for k, v in fleet[2].items() if k != "mask"} | {"labelled": False}
    fleet[3] = dict(fleet[3], labelled=False)  # contoured, but the site keeps it for semi-supervised training
    assert positions_in_split(fleet, "train") == [0, 1]
    assert positions_in_split(fleet, "train+unlabelled") == [0, 1, 2, 3]
    assert positions_in_split(fleet, "unlabelled") == [2, 3]

    teacher = DOMAIN.build_model()
    wrapped = pseudo_labelled(fleet, [True, True, False, False], lambda case: np.full(case["image"].shape, 1, np.uint8))
    assert wrapped[0]["mask"] is fleet[0]["mask"] and (wrapped[2]["mask"] == 1).all() and (wrapped[3]["mask"] == 1).all()
    assert "mask" not in fleet[2] and set(np.unique(fleet[3]["mask"])) == {0, 1, 2}

    weights = {k: v.numpy() for k, v in teacher.state_dict().items()}
    params = {"domain": DOMAIN.name, "weights": weights, "epochs": 1, "batch_size": 4, "lr": 1e-3, "optimizer": "adam",
              "seed": 1, "max_steps": 2, "split": "train+unlabelled"}
    assert TASKS["local_train"].problems(params) == []
    result = run_installed_task("local_train", fleet, params, min_cohort=2)
    assert set(result) == {"weights", "scalars"}
    assert result["scalars"]["pseudo_labelled_cases"] == 2.0
    labelled_only = run_installed_task("local_train", fleet, {**params, "split": "train"}, min_cohort=2)
    assert labelled_only["scalars"]["pseudo_labelled_cases"] == 0.0


def test_a_plan_trains_semi_supervised_from_the_round_it_names_without_changing_other_plans_labels() -> None:
    plain = TrainingPlan(domain="liver_ct_segmentation", strategy="fedavg", rounds=4)
    assert "semi_supervised_from" not in plain.identity()
    student = TrainingPlan(domain="liver_ct_segmentation", strategy="fedavg", rounds=4, semi_supervised_from=2)
    assert student.label != plain.label
    assert [student.training_split(r) for r in range(1, 5)] == ["train", "train+unlabelled", "train+unlabelled", "train+unlabelled"]
    with pytest.raises(ValueError, match="semi_supervised_from"):
        TrainingPlan(domain="liver_ct_segmentation", strategy="fedavg", rounds=4, semi_supervised_from=5)


def test_teacher_student_reads_the_unlabelled_flag_from_the_case_store_manifest(cases: list[dict], tmp_path) -> None:
    """At a site the flag comes from the manifest (the `--splits` CSV's `unlabelled`), cases are read lazily."""
    from datasite_setup.case_store import CaseSource, CaseStore

    store = CaseStore(tmp_path)
    version = store.new_version()
    for i, case in enumerate(cases[:4]):
        stored = case if i < 2 else {k: v for k, v in case.items() if k != "mask"}
        store.put(stored, patient=f"p{i}", split="train", labelled=i < 2, version=version, mask_labels=("liver", "lesion") if i < 2 else ())
    source = CaseSource(store.root, [e.to_dict() for e in store.manifest()])
    weights = {k: v.numpy() for k, v in DOMAIN.build_model().state_dict().items()}
    params = {"domain": DOMAIN.name, "weights": weights, "epochs": 1, "batch_size": 8, "lr": 1e-3, "optimizer": "adam",
              "seed": 1, "max_steps": 1, "split": "train+unlabelled"}
    assert run_installed_task("local_train", source, params, min_cohort=2)["scalars"]["pseudo_labelled_cases"] == 2.0
    assert run_installed_task("local_train", source, {**params, "split": "unlabelled"}, min_cohort=2)["scalars"]["pseudo_labelled_cases"] == 2.0


def test_the_loss_is_monai_dice_ce_and_skips_voxels_a_teacher_was_unsure_of() -> None:
    from monai.losses import DiceCELoss

    from domains.liver_ct_segmentation import IGNORE

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 8, generator=generator)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=generator).float()
    expected = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)(logits, target)
    assert float(DOMAIN.loss(logits, target)) == pytest.approx(float(expected), rel=1e-5)
    unsure = target.clone()
    unsure[:, :, :4] = IGNORE
    changed = logits.clone()
    changed[:, :, :4] = torch.randn(2, 3, 4, 8, 8, generator=generator) * 5
    assert float(DOMAIN.loss(changed, unsure)) == pytest.approx(float(DOMAIN.loss(logits, unsure)), rel=1e-6)


def test_pseudo_labels_leave_out_the_voxels_the_teacher_is_unsure_of(cases: list[dict]) -> None:
    from domains.liver_ct_segmentation import IGNORE

    torch.manual_seed(0)
    untrained = DOMAIN.build_model()
    labels = DOMAIN.pseudo_label(untrained, cases[0])
    probabilities = DOMAIN.predict_probabilities(untrained, cases[0])
    unsure = probabilities.max(axis=0) < DOMAIN.pseudo_label_confidence
    assert labels.shape == cases[0]["image"].shape and unsure.any()
    organ = largest_organ(np.argmax(probabilities, axis=0).astype(np.uint8))
    assert (labels[unsure] == IGNORE).all() and (labels[~unsure] == organ[~unsure]).all()


def test_pseudo_labels_keep_only_the_largest_connected_liver_with_its_lesions() -> None:
    labels = np.zeros((12, 20, 20), np.uint8)
    labels[2:10, 2:12, 2:12] = 1  # the liver
    labels[4:6, 4:6, 4:6] = 2  # a lesion in it
    labels[2:4, 15:18, 15:18] = 1  # an island the teacher took for liver (spleen, bowel)
    labels[9:11, 16:18, 2:4] = 2  # a "lesion" outside the liver
    kept = largest_organ(labels)
    assert (kept[2:10, 2:12, 2:12] == labels[2:10, 2:12, 2:12]).all()
    assert np.count_nonzero(kept) == np.count_nonzero(labels[2:10, 2:12, 2:12])
    assert (largest_organ(np.zeros_like(labels)) == 0).all()


def test_a_teacher_sent_beside_the_weights_labels_the_unlabelled_cases(cases: list[dict]) -> None:
    """The student trains from `weights`; the unlabelled cases are labelled by `teacher` when one is
    sent (the federation's best model so far), else by `weights`. A teacher is checked like the
    weights and taken only for a teacher-student split."""
    fleet = [dict(case, split="train") for case in cases[:4]]
    fleet[2] = {k: v for k, v in fleet[2].items() if k != "mask"} | {"labelled": False}
    fleet[3] = {k: v for k, v in fleet[3].items() if k != "mask"} | {"labelled": False}
    torch.manual_seed(0)
    weights = {k: v.numpy().copy() for k, v in DOMAIN.build_model().state_dict().items()}
    bias = [name for name in weights if name.endswith("bias") and weights[name].shape == (3,)][-1]  # the output layer
    sure_liver = {**weights, bias: np.array([0.0, 30.0, 0.0], np.float32)}  # every voxel liver, confidently
    params = {"domain": DOMAIN.name, "weights": weights, "epochs": 1, "batch_size": 4, "lr": 1e-3, "optimizer": "adam",
              "seed": 1, "max_steps": 2, "split": "train+unlabelled"}
    received = run_installed_task("local_train", fleet, params, min_cohort=2)["weights"]
    same = run_installed_task("local_train", fleet, {**params, "teacher": weights}, min_cohort=2)["weights"]
    taught = run_installed_task("local_train", fleet, {**params, "teacher": sure_liver}, min_cohort=2)["weights"]
    assert all(np.array_equal(received[k], same[k]) for k in received)
    assert any(not np.allclose(received[k], taught[k]) for k in received)

    task = TASKS["local_train"]
    assert task.problems({**params, "teacher": sure_liver}) == []
    assert "train+unlabelled only" in task.policy({**params, "split": "train", "teacher": weights}, SiteFacts(min_cohort=2))
    wrong = {**weights, bias: np.zeros(4, np.float32)}
    assert f"teacher['{bias}'] has shape (4,)" in task.policy({**params, "teacher": wrong}, SiteFacts(min_cohort=2))
    assert "weight names" in task.policy({**params, "teacher": {"x": np.zeros(1, np.float32)}}, SiteFacts(min_cohort=2))
    assert "NaN" in task.policy({**params, "teacher": {**weights, bias: np.full(3, np.nan, np.float32)}}, SiteFacts(min_cohort=2))


def test_a_case_whose_pseudo_label_is_unsure_everywhere_gives_no_patches(cases: list[dict]) -> None:
    from domains.liver_ct_segmentation import IGNORE

    processed = preprocess_ct(cases[0])
    processed.mask[:] = IGNORE
    images, labels = case_patches(processed, DOMAIN.sampling, np.random.default_rng(0))
    assert images.shape == labels.shape == (0, 1, *DOMAIN.sampling.patch_size)

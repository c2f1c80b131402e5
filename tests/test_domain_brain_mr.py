"""The brain-MR domain as an orchestrator sees it: registry, model, loss, tensors, counts."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import domains
from domains.brain_mr_segmentation import DOMAIN, PROFILES, UNet2D, generate_case
from domains.brain_mr_segmentation.cases import check_segmentation_case, fit_centre, normalise_volume, slices_for_training
from domains.brain_mr_segmentation.loss import dice_bce_loss
from domains.brain_mr_segmentation.metrics import add_counts, confusion_counts, metrics_from_counts


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny convolutions run fastest on one thread, and far slower on two when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tumour_cases():
    profile = replace(PROFILES["hospital-a"], tumour_prevalence=1.0)
    rng = np.random.default_rng(2)
    return [generate_case(profile, rng).as_record(f"a-{i}") for i in range(2)]


@pytest.fixture(scope="module")
def ge_case():
    return generate_case(PROFILES["hospital-c"], np.random.default_rng(4)).as_record("c-0")


def test_registry_returns_the_domain_and_names_known_ones():
    assert "brain_mr_segmentation" in domains.DOMAINS
    domain = domains.get_domain("brain_mr_segmentation")
    assert domain is DOMAIN and domain.name == "brain_mr_segmentation"
    assert isinstance(domain, domains.Domain)
    with pytest.raises(ValueError, match="brain_mr_segmentation"):
        domains.get_domain("lung_ct")


def test_unet_keeps_spatial_shape_and_has_batchnorm():
    model = UNet2D(base_channels=4)
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 64, 64)
    assert model(torch.zeros(1, 1, 48, 72)).shape == (1, 1, 48, 72)
    batchnorms = [name for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert len(batchnorms) == 2 * 7 and all(".bn" in name for name in batchnorms)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.zeros(1, 1, 60, 64))


def test_domain_model_starts_predicting_background(ge_case):
    model = DOMAIN.build_model()
    counts = DOMAIN.evaluation_counts(model, [ge_case])
    assert counts["tp"] + counts["fp"] < 0.05 * ge_case["mask"].size


def test_loss_prefers_the_right_answer_and_decreases_when_training():
    torch.manual_seed(0)
    target = torch.zeros(4, 1, 16, 16)
    target[:, :, 4:10, 5:12] = 1
    assert dice_bce_loss(20 * (2 * target - 1), target) < 0.05 < dice_bce_loss(-20 * (2 * target - 1), target)

    model = UNet2D(base_channels=4)
    images = target + 0.3 * torch.randn_like(target)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(20):
        optimiser.zero_grad()
        loss = dice_bce_loss(model(images), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_metrics_from_known_counts():
    metrics = metrics_from_counts({"tp": 8, "fp": 2, "tn": 88, "fn": 2})
    assert metrics["dice"] == pytest.approx(0.8)
    assert metrics["f1"] == pytest.approx(0.8)
    assert metrics["sensitivity"] == pytest.approx(0.8)
    assert metrics["specificity"] == pytest.approx(88 / 90)
    assert metrics_from_counts({"tp": 0, "fp": 0, "tn": 50, "fn": 0})["dice"] == 1.0
    assert metrics_from_counts({"tp": 0, "fp": 3, "tn": 50, "fn": 0})["dice"] == 0.0
    with pytest.raises(KeyError, match="fn"):
        metrics_from_counts({"tp": 1, "fp": 0, "tn": 1})
    with pytest.raises(ValueError):
        metrics_from_counts({"tp": -1, "fp": 0, "tn": 1, "fn": 0})


def test_confusion_counts_of_arrays_add_up():
    target = np.array([[1, 1, 0, 0], [0, 0, 0, 1]])
    prediction = np.array([[1, 0, 1, 0], [0, 0, 0, 1]])
    counts = confusion_counts(prediction, target)
    assert counts == {"tp": 2, "fp": 1, "tn": 4, "fn": 1}
    assert add_counts(counts, counts) == {"tp": 4, "fp": 2, "tn": 8, "fn": 2}


def test_normalisation_ignores_scanner_scale_and_offset(ge_case):
    image = ge_case["image"]
    np.testing.assert_allclose(normalise_volume(image), normalise_volume(2.7 * image + 400), atol=1e-4)
    assert np.all(normalise_volume(np.full((2, 8, 8), 5.0)) == 0)


def test_slices_are_padded_centred_to_a_multiple_of_eight(tumour_cases, ge_case):
    x, y = slices_for_training([ge_case, *tumour_cases])
    depth_c, depth_a = ge_case["image"].shape[0], tumour_cases[0]["image"].shape[0]
    assert x.shape == y.shape == (depth_c + 2 * depth_a, 1, 64, 64)
    assert x.dtype == y.dtype == np.float32 and set(np.unique(y)) <= {0.0, 1.0}
    np.testing.assert_array_equal(y[:depth_c, 0, 2:62, 2:62], ge_case["mask"])
    np.testing.assert_array_equal(fit_centre(y[:depth_c, 0], (60, 60), fill=0), ge_case["mask"])

    cropped, _ = slices_for_training(tumour_cases, size=(48, 56))
    assert cropped.shape[2:] == (48, 56)
    with pytest.raises(ValueError, match="multiple of 8"):
        slices_for_training(tumour_cases, size=(50, 56))
    with pytest.raises(ValueError, match="mask"):
        check_segmentation_case({k: v for k, v in ge_case.items() if k != "mask"})


def test_batches_cover_every_slice_once_and_are_reproducible(tumour_cases):
    n_slices = sum(case["image"].shape[0] for case in tumour_cases)
    batches = list(DOMAIN.batches(tumour_cases, 10, np.random.default_rng(0)))
    assert sum(len(x) for x, _ in batches) == n_slices
    assert all(x.shape[1:] == y.shape[1:] == (1, 64, 64) for x, y in batches)
    assert float(sum(y.sum() for _, y in batches)) == sum(case["mask"].sum() for case in tumour_cases)
    again = list(DOMAIN.batches(tumour_cases, 10, np.random.default_rng(0)))
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(batches, again))


def test_counts_cover_the_original_voxels_only(ge_case, tumour_cases):
    counts = DOMAIN.evaluation_counts(DOMAIN.build_model(), [ge_case, *tumour_cases])
    assert set(counts) == {"tp", "fp", "tn", "fn"} and all(isinstance(v, int) for v in counts.values())
    assert sum(counts.values()) == sum(case["mask"].size for case in [ge_case, *tumour_cases])
    assert counts["tp"] + counts["fn"] == sum(int(case["mask"].sum()) for case in [ge_case, *tumour_cases])


def test_a_few_adam_steps_raise_dice(tumour_cases):
    torch.manual_seed(0)
    model = DOMAIN.build_model()
    untrained = DOMAIN.metrics_from_counts(DOMAIN.evaluation_counts(model, tumour_cases))["dice"]
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(8):
        for x, y in DOMAIN.batches(tumour_cases, 8, rng):
            optimiser.zero_grad()
            DOMAIN.loss(model(x), y).backward()
            optimiser.step()
    trained = DOMAIN.metrics_from_counts(DOMAIN.evaluation_counts(model, tumour_cases))["dice"]
    assert trained > untrained + 0.3, (untrained, trained)
    assert model.training

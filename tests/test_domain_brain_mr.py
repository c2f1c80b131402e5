"""The brain-MR domain as an orchestrator sees it: registry, model, loss, preprocessing, tensors, counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation, binary_fill_holes
from skimage.filters import threshold_otsu

import domains
from analyses.federation.fedbn import is_normalisation
from domains.brain_mr_segmentation import (
    DOMAIN, PROFILES, BrainMRSegmentation, PreprocessingSettings, ScannerAugmentation, UNet2D, augment_slices, generate_case, preprocess_case,
)
from domains.brain_mr_segmentation.cases import check_segmentation_case, foreground_mask, normalise_volume, slices_for_training
from domains.brain_mr_segmentation.loss import dice_bce_loss
from domains.brain_mr_segmentation.metrics import add_counts as brain_mr_add_counts
from domains.segmentation_metrics import add_counts, confusion_counts, hd95_mm, metrics_from_counts
from domains.case_record import make_case_record


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


def test_unet_keeps_spatial_shape_and_normalises_without_running_statistics():
    """GroupNorm, never BatchNorm: averaged weights need no running statistics, so a model scores
    the same in train and eval mode, and FedBN still finds the normalisation parameters by name."""
    model = UNet2D(base_channels=4)
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 64, 64)
    assert model(torch.zeros(1, 1, 48, 72)).shape == (1, 1, 48, 72)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.zeros(1, 1, 60, 64))

    model = DOMAIN.build_model()
    norms = {name for name, module in model.named_modules() if isinstance(module, (torch.nn.GroupNorm, torch.nn.InstanceNorm2d))}
    assert len(norms) == 2 * 7
    assert not any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in model.modules())
    state = model.state_dict()
    assert not any("running" in key or "num_batches" in key for key in state)
    assert {key for key in state if is_normalisation(key)} == {f"{name}.{p}" for name in norms for p in ("weight", "bias")}

    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        model.train()
        trained_mode = model(x)
        model.eval()
        np.testing.assert_allclose(model(x).numpy(), trained_mode.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(model(x[:1]).numpy(), trained_mode[:1].numpy(), rtol=1e-4, atol=1e-5)


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
    assert "hd95_mm" not in metrics
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
    pooled = {"tp": 8, "fp": 2, "tn": 88, "fn": 2, "hd95_sum_um": 4500 + 1500, "hd95_cases": 2}
    assert metrics_from_counts(pooled)["hd95_mm"] == pytest.approx(3.0)


def test_confusion_counts_of_arrays_add_up():
    target = np.array([[1, 1, 0, 0], [0, 0, 0, 1]])
    prediction = np.array([[1, 0, 1, 0], [0, 0, 0, 1]])
    counts = confusion_counts(prediction, target)
    assert counts == {"tp": 2, "fp": 1, "tn": 4, "fn": 1}
    assert add_counts(counts, counts) == {"tp": 4, "fp": 2, "tn": 8, "fn": 2}
    with_hd95 = {**counts, "hd95_sum_um": 1500, "hd95_cases": 1}
    assert add_counts(with_hd95, with_hd95) == {"tp": 4, "fp": 2, "tn": 8, "fn": 2, "hd95_sum_um": 3000, "hd95_cases": 2}


def test_hd95_of_a_shifted_box_and_of_empty_masks():
    target = np.zeros((6, 20, 20), np.uint8)
    target[1:5, 5:12, 5:12] = 1
    shifted = np.roll(target, 2, axis=2)
    assert hd95_mm(shifted, target, (3.0, 1.5, 1.5)) == pytest.approx(3.0)
    assert hd95_mm(target, target, (3.0, 1.5, 1.5)) == 0.0
    assert hd95_mm(np.zeros_like(target), np.zeros_like(target), (3.0, 1.5, 1.5)) == 0.0
    diagonal = float(np.linalg.norm([6 * 3.0, 20 * 1.5, 20 * 1.5]))
    assert hd95_mm(np.zeros_like(target), target, (3.0, 1.5, 1.5)) == pytest.approx(diagonal)


def test_normalisation_ignores_scanner_scale_and_offset(ge_case):
    image = ge_case["image"]
    np.testing.assert_allclose(normalise_volume(image), normalise_volume(2.7 * image + 400), atol=1e-4)
    assert np.all(normalise_volume(np.full((2, 8, 8), 5.0)) == 0)


def test_slices_are_cropped_to_the_body_and_padded_to_a_multiple_of_eight(tumour_cases, ge_case):
    x, y = slices_for_training([ge_case, *tumour_cases])
    assert x.shape == y.shape and x.shape[1] == 1 and x.shape[2] % 8 == 0 == x.shape[3] % 8
    assert x.shape[2] <= 64 and x.shape[3] <= 64  # cropped to the head, never larger than the scan
    assert x.dtype == y.dtype == np.float32 and set(np.unique(y)) <= {0.0, 1.0}
    # these phantoms are coarser than the target spacing, so nothing is resampled and the crop
    # keeps every tumour voxel
    assert float(y.sum()) == sum(int(case["mask"].sum()) for case in [ge_case, *tumour_cases])

    cropped, _ = slices_for_training(tumour_cases, size=(48, 56))
    assert cropped.shape[2:] == (48, 56)
    with pytest.raises(ValueError, match="multiple of 8"):
        slices_for_training(tumour_cases, size=(50, 56))
    with pytest.raises(ValueError, match="mask"):
        check_segmentation_case({k: v for k, v in ge_case.items() if k != "mask"})


def test_batches_balance_tumour_slices_and_are_reproducible(tumour_cases, ge_case):
    cases = [*tumour_cases, ge_case]
    x, y = slices_for_training(cases)
    assert 0 < (y.reshape(len(y), -1).max(axis=1)).mean() < 0.5  # tumour slices are the minority
    batches = list(DOMAIN.batches(cases, 10, np.random.default_rng(0)))
    assert sum(len(bx) for bx, _ in batches) == len(x)
    assert all(bx.shape[1:] == by.shape[1:] == x.shape[1:] for bx, by in batches)
    drawn = torch.cat([by for _, by in batches])
    assert (drawn.flatten(1).amax(dim=1) > 0).float().mean() >= 0.5
    again = list(DOMAIN.batches(cases, 10, np.random.default_rng(0)))
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(batches, again))


def test_augmentation_changes_the_look_of_slices_but_not_their_scale_or_tumour(tumour_cases):
    x, y = next(iter(BrainMRSegmentation(augmentation=None).batches(tumour_cases, 8, np.random.default_rng(0))))
    x_before, y_before = x.clone(), y.clone()
    ax, ay = augment_slices(x, y, np.random.default_rng(1))
    again_x, again_y = augment_slices(x, y, np.random.default_rng(1))
    other_x, _ = augment_slices(x, y, np.random.default_rng(2))
    assert torch.equal(x, x_before) and torch.equal(y, y_before)  # inputs untouched
    assert torch.equal(ax, again_x) and torch.equal(ay, again_y) and not torch.equal(ax, other_x)
    assert ax.shape == x.shape and ax.dtype == x.dtype and type(ax) is torch.Tensor
    assert not torch.equal(ax, x)
    for i in range(len(x)):
        flipped = torch.equal(ay[i], y[i].flip(-1)) and not torch.equal(ay[i], y[i])
        assert torch.equal(ay[i], y[i]) or flipped  # masks only follow the flips
        assert torch.allclose(ax[i].mean(), x[i].mean(), atol=1e-4) and torch.allclose(ax[i].std(), x[i].std(), rtol=1e-3)
    unchanged = ScannerAugmentation(gamma_prob=0, bias_prob=0, noise_prob=0, flip_prob=0)
    same_x, same_y = augment_slices(x, y, np.random.default_rng(1), unchanged)
    assert torch.allclose(same_x, x, atol=1e-5) and torch.equal(same_y, y)
    with pytest.raises(ValueError, match="gamma_prob"):
        ScannerAugmentation(gamma_prob=1.5)


def test_counts_cover_the_original_voxels_only(ge_case, tumour_cases):
    counts = DOMAIN.evaluation_counts(DOMAIN.build_model(), [ge_case, *tumour_cases])
    assert set(counts) == {"tp", "fp", "tn", "fn", "hd95_sum_um", "hd95_cases", "cases", "dice_sum_ppm", "sensitivity_sum_ppm",
                           "specificity_sum_ppm"} and all(isinstance(v, int) for v in counts.values())
    assert counts["hd95_cases"] == counts["cases"] == 3
    assert set(DOMAIN.metrics_from_counts(counts)) | set(counts) == DOMAIN.evaluation_scalars
    assert sum(counts[k] for k in ("tp", "fp", "tn", "fn")) == sum(case["mask"].size for case in [ge_case, *tumour_cases])
    assert counts["tp"] + counts["fn"] == sum(int(case["mask"].sum()) for case in [ge_case, *tumour_cases])


def test_per_case_means_weigh_every_case_alike_and_survive_without_the_voxel_counts():
    """A large case segmented perfectly and a small one missed: pooled Dice follows the voxels,
    the per-case mean gives each case half; without the voxel and HD95 counts (what a site that
    noises evaluations releases) only the per-case means remain, each noised sum capped at what
    its cases can add."""
    from domains.brain_mr_segmentation.metrics import EVALUATION_BOUNDS, PPM, case_counts

    large, small = np.zeros((4, 40, 40), np.uint8), np.zeros((4, 40, 40), np.uint8)
    large[:, 5:35, 5:35] = 1
    small[1:3, 10:12, 10:12] = 1
    counts = brain_mr_add_counts(case_counts(large, large, (3.0, 1.0, 1.0)), case_counts(np.zeros_like(small), small, (3.0, 1.0, 1.0)))
    metrics = DOMAIN.metrics_from_counts(counts)
    assert metrics["dice"] > 0.99 and metrics["dice_per_case"] == pytest.approx(0.5)
    assert metrics["sensitivity_per_case"] == pytest.approx(0.5) and metrics["specificity_per_case"] == 1.0
    released = {key: counts[key] for key in EVALUATION_BOUNDS}
    assert set(DOMAIN.metrics_from_counts(released)) == {"dice_per_case", "sensitivity_per_case", "specificity_per_case"}
    assert DOMAIN.metrics_from_counts({**released, "dice_sum_ppm": 5 * PPM})["dice_per_case"] == 1.0
    assert DOMAIN.metrics_from_counts({**released, "dice_sum_ppm": -PPM})["dice_per_case"] == 0.0
    with pytest.raises(KeyError, match="per-case sums"):
        DOMAIN.metrics_from_counts({"cases": 2})


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


def limb_case(
    case_id: str = "limb-0", seed: int = 0, spacing_mm: float = 1.0, shape: tuple[int, int, int] = (12, 64, 128), tumour_mm: tuple[float, float] = (9.0, 7.0)
) -> dict[str, Any]:
    """A thigh-like T1 phantom, not a head: an elongated off-centre cross-section (long along z)
    with a bright fat rim, darker muscle, a bright marrow core in a dark cortical ring, and a
    tumour a little brighter than muscle. Otsu separates fat and marrow from muscle and loses
    the tumour; air is Rician-like noise."""
    rng = np.random.default_rng(seed)
    n_z, n_y, n_x = shape
    y = (np.arange(n_y) - n_y * 0.45)[:, None] * spacing_mm
    x = (np.arange(n_x) - n_x * 0.55)[None, :] * spacing_mm
    radius = np.sqrt((x / 50.0) ** 2 + (y / 24.0) ** 2)
    bone = np.sqrt((x + 12) ** 2 + y**2)
    tumour = np.sqrt(((x - 20) / tumour_mm[0]) ** 2 + ((y + 4) / tumour_mm[1]) ** 2)
    plane = np.zeros((n_y, n_x), np.float32)
    plane[radius <= 1.0] = 1.0
    plane[radius <= 0.85] = 0.38
    plane[bone <= 8] = 0.05
    plane[bone <= 6] = 0.9
    plane[tumour <= 1.0] = 0.5
    image = np.repeat(plane[None], n_z, axis=0)
    noise = 0.02 * rng.standard_normal((2, *shape)).astype(np.float32)
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2) * 800 + 20
    mask = np.zeros(shape, np.uint8)
    mask[2:10] = (tumour <= 1.0)[None]
    return make_case_record(case_id, image, mask, (5.0, spacing_mm, spacing_mm), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), {"site": "limb"})


def test_foreground_of_a_limb_keeps_the_lesion_where_a_head_threshold_loses_it():
    case = limb_case()
    image, lesion = case["image"], case["mask"] > 0
    assert (image > threshold_otsu(image))[lesion].mean() < 0.1  # the old head-shaped assumption
    inside = foreground_mask(image)
    assert inside[lesion].all()
    limb = binary_fill_holes(case["image"][0] > 200)
    near_limb = binary_dilation(limb, iterations=2)
    assert all(plane[limb].all() and not plane[~near_limb].any() for plane in inside)
    normalised = normalise_volume(image)
    assert abs(float(normalised[inside].mean())) < 1e-3 and float(normalised[inside].std()) == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(normalised, normalise_volume(0.3 * image + 1000), atol=1e-3)

    processed = preprocess_case(case)
    assert int(processed.mask.sum()) > 0.9 * int(case["mask"].sum()) / 4  # 1 mm -> 2 mm: a quarter of the voxels
    # cropped from the 32 x 64 grid of the 2 mm field of view to the limb (48 x 100 mm) and a margin
    assert processed.image.shape[1] <= 24 + 6 and processed.image.shape[2] <= 50 + 6
    back = processed.to_original_grid(processed.mask.astype(np.float32)) > 0.5
    assert metrics_from_counts(confusion_counts(back, case["mask"]))["dice"] > 0.9


def test_finer_scans_are_resampled_to_the_target_spacing():
    """1.0 mm and 1.17 mm scans of the same limb meet on the 2 mm grid; a scan coarser than the
    target keeps its own grid (upsampling adds no information); the tumour keeps its size in mm."""
    fine = preprocess_case(limb_case("fine", spacing_mm=1.0, shape=(12, 96, 192)))
    other = preprocess_case(limb_case("other", spacing_mm=1.17, shape=(12, 82, 164)))
    coarse = preprocess_case(limb_case("coarse", spacing_mm=3.0, shape=(12, 32, 64)))
    assert fine.spacing == pytest.approx((5.0, 2.0, 2.0)) and other.spacing == pytest.approx((5.0, 2.0, 2.0))
    assert coarse.spacing == pytest.approx((5.0, 3.0, 3.0))
    assert abs(fine.image.shape[1] - other.image.shape[1]) <= 2 and abs(fine.image.shape[2] - other.image.shape[2]) <= 2
    area = {name: float(p.mask.sum()) * p.spacing[1] * p.spacing[2] for name, p in (("fine", fine), ("other", other), ("coarse", coarse))}
    assert area["other"] == pytest.approx(area["fine"], rel=0.1) and area["coarse"] == pytest.approx(area["fine"], rel=0.2)
    assert preprocess_case(limb_case(spacing_mm=1.0), PreprocessingSettings(target_spacing_mm=(1.0, 1.0))).spacing == pytest.approx((5.0, 1.0, 1.0))


def test_orientation_is_canonical_whatever_the_stored_direction(ge_case):
    """A series stored with rows running anterior (flipped y) is the same scan: the same model input."""
    flipped = dict(ge_case)
    flipped["image"], flipped["mask"] = ge_case["image"][:, ::-1].copy(), ge_case["mask"][:, ::-1].copy()
    direction = np.array(ge_case["direction"]).reshape(3, 3)
    direction[:, 1] *= -1
    flipped["direction"] = list(direction.ravel())
    flipped["origin"] = list(np.array(ge_case["origin"]) + direction[:, 1] * -(ge_case["image"].shape[1] - 1) * ge_case["spacing"][1])
    a, b = preprocess_case(ge_case), preprocess_case(flipped)
    np.testing.assert_allclose(a.image, b.image, atol=1e-4)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(b.to_original_grid(b.mask.astype(np.float32)) > 0.5, flipped["mask"] > 0)


def test_bias_prior_follows_the_data_foreground_fraction():
    small = [limb_case("s", seed=1, spacing_mm=2.0, shape=(12, 48, 96))]
    large = [limb_case("l", seed=1, spacing_mm=2.0, shape=(12, 48, 96), tumour_mm=(18.0, 12.0))]
    counts = DOMAIN.foreground_counts(small)
    processed = preprocess_case(small[0])
    assert counts == {"tumour_voxels": int(processed.mask.sum()), "voxels": int(processed.mask.size)}
    small_prior = DOMAIN.prior_from_counts(counts)
    large_counts = DOMAIN.foreground_counts(large)
    large_prior = DOMAIN.prior_from_counts(large_counts)
    assert large_prior > 2.5 * small_prior > 0
    pooled = DOMAIN.prior_from_counts({key: counts[key] + large_counts[key] for key in counts})
    assert small_prior < pooled < large_prior
    for prior in (small_prior, large_prior):
        assert torch.sigmoid(DOMAIN.build_model(prior).head.bias).item() == pytest.approx(prior, rel=1e-4)
    assert DOMAIN.prior_from_counts({"tumour_voxels": 0, "voxels": 0}) == pytest.approx(0.1)
    assert torch.sigmoid(DOMAIN.build_model().head.bias).item() == pytest.approx(0.1, rel=1e-4)


class MemoryMappedCases(Sequence):
    """A lazy case source like the site's case store: records built on access, volumes memory-mapped."""

    def __init__(self, records: list[dict[str, Any]], folder: Path) -> None:
        self.entries = []
        for i, record in enumerate(records):
            paths = {}
            for key in ("image", "mask"):
                paths[key] = folder / f"{i}-{key}.npy"
                np.save(paths[key], record[key])
            self.entries.append((record, paths))
        self.reads = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, paths = self.entries[index]
        self.reads += 1
        return {**record, **{key: np.load(path, mmap_mode="r") for key, path in paths.items()}}


def test_a_lazy_memory_mapped_case_source_gives_the_same_slices_and_counts(tumour_cases, tmp_path):
    lazy = MemoryMappedCases(tumour_cases, tmp_path)
    x_lazy, y_lazy = slices_for_training(lazy)
    x, y = slices_for_training(tumour_cases)
    np.testing.assert_array_equal(x_lazy, x)
    np.testing.assert_array_equal(y_lazy, y)
    model = DOMAIN.build_model()
    assert DOMAIN.evaluation_counts(model, lazy) == DOMAIN.evaluation_counts(model, tumour_cases)
    assert lazy.reads == 2 * len(tumour_cases)


def test_preprocessing_leaves_the_record_untouched(ge_case):
    image, mask = ge_case["image"].copy(), ge_case["mask"].copy()
    DOMAIN.evaluation_counts(DOMAIN.build_model(), [ge_case])
    list(DOMAIN.batches([ge_case], 8, np.random.default_rng(0)))
    np.testing.assert_array_equal(ge_case["image"], image)
    np.testing.assert_array_equal(ge_case["mask"], mask)

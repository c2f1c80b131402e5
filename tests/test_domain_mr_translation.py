"""The MR translation domain: phantom contrasts, a generator whose channel layout is complete
(permuting or growing any group leaves its function unchanged), additive metrics, and a short
training that beats copying the source."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from domains import get_domain
from domains.brain_mr_segmentation.scanner_profiles import PROFILES as SCANNERS
from domains.channel_widths import ChannelWidths, segment_slices
from domains.domain import Domain
from domains.mr_translation import (
    DOMAIN, PROFILES, add_counts, metrics_from_counts, phantom_records, preprocess_pair, translation_counts,
)
from domains.mr_translation.anatomy import LABEL, draw_anatomy
from domains.mr_translation.contrasts import render_contrast, tissue_signal
from domains.mr_translation.metrics import PSNR_CAP_DB



@pytest.fixture(scope="module")
def cases() -> list[dict[str, Any]]:
    return phantom_records("hospital-a", 2, seed=4, n_slices=8) + phantom_records("hospital-c", 2, seed=5, n_slices=8)


def randomised(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every weight random (norm scales and shifts too: their defaults 1 and 0 would permute trivially)."""
    generator = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(value.shape, generator=generator) * 0.5 for name, value in model.state_dict().items()}
    model.load_state_dict(state)
    return state


def test_domain_satisfies_both_protocols_and_is_registered() -> None:
    assert isinstance(DOMAIN, Domain) and isinstance(DOMAIN, ChannelWidths)
    assert get_domain("mr_translation") is DOMAIN
    assert DOMAIN.primary_metric == "psnr" and DOMAIN.higher_is_better
    assert len(PROFILES) >= 4
    for widths in (DOMAIN.base_widths, DOMAIN.max_widths):
        state = DOMAIN.build_model(widths).state_dict()
        layout = DOMAIN.channel_layout(widths)
        for name, axes in layout.items():
            for axis, segments in axes.items():
                assert state[name].shape[axis] == sum(length for _, length in segments), (name, axis)
        # every weight with a channel-sized axis is in the layout; only the head's bias (one output) is not
        assert set(state) - set(layout) == {"head.conv.bias"}
        for group in DOMAIN.channel_groups:
            for name, axis in group.produced_by:
                assert segment_slices(layout[name][axis], group.name) is not None
    with pytest.raises(ValueError, match="outside"):
        DOMAIN.build_model({**DOMAIN.base_widths, "enc1": DOMAIN.max_widths["enc1"] + 1})


def test_permuting_any_group_consistently_leaves_the_output_unchanged() -> None:
    widths = dict(DOMAIN.base_widths)
    model = DOMAIN.build_model(widths).eval()
    state = randomised(model, 0)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    layout = DOMAIN.channel_layout(widths)
    rng = np.random.default_rng(2)
    for group in DOMAIN.channel_groups:
        order = torch.from_numpy(rng.permutation(widths[group.name]))
        permuted = {name: value.clone() for name, value in state.items()}
        for name, axes in layout.items():
            for axis, segments in axes.items():
                where = segment_slices(segments, group.name)
                if where is not None:
                    index = torch.arange(permuted[name].shape[axis])
                    index[where] = where.start + order
                    permuted[name] = permuted[name].index_select(axis, index)
        moved = DOMAIN.build_model(widths).eval()
        moved.load_state_dict(permuted)
        with torch.no_grad():
            torch.testing.assert_close(moved(x), expected, atol=1e-5, rtol=1e-4)
        assert not torch.equal(permuted[group.produced_by[0][0]], state[group.produced_by[0][0]])


def test_growing_every_group_with_unconsumed_channels_leaves_the_output_unchanged() -> None:
    """New channels get random producing weights and zero consuming weights, as FedMA adds them."""
    small, large = dict(DOMAIN.base_widths), dict(DOMAIN.max_widths)
    model = DOMAIN.build_model(small).eval()
    state = randomised(model, 3)
    grown_model = DOMAIN.build_model(large).eval()
    grown = randomised(grown_model, 4)
    small_layout, large_layout = DOMAIN.channel_layout(small), DOMAIN.channel_layout(large)
    producing = {(name, axis) for group in DOMAIN.channel_groups for name, axis in group.produced_by}
    for name, value in state.items():
        target = grown[name]
        old_index = [torch.arange(n) for n in value.shape]
        for axis, segments in large_layout.get(name, {}).items():
            positions = []
            for (group, old), (_, new) in zip(small_layout[name][axis], segments):
                start = sum(length for _, length in segments[: [g for g, _ in segments].index(group)])
                positions.append(torch.arange(start, start + old))
                if (name, axis) not in producing:  # a consumer of the new channels reads zeros from them
                    target.index_fill_(axis, torch.arange(start + old, start + new), 0.0)
            old_index[axis] = torch.cat(positions)
        target[torch.meshgrid(*old_index, indexing="ij")] = value
    grown_model.load_state_dict(grown)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(grown_model(x), model(x), atol=1e-5, rtol=1e-4)


def test_phantom_contrasts_order_tissues_as_t1_and_t2_do() -> None:
    scanner = SCANNERS["hospital-a"]
    anatomy = draw_anatomy(scanner.shape, scanner.spacing, np.random.default_rng(0), tumour_prevalence=1.0)
    flat = np.ones(scanner.shape, dtype=np.float32)
    t1 = render_contrast(anatomy, tissue_signal("T1", 1.0), flat, scanner, np.random.default_rng(1))
    t2 = render_contrast(anatomy, tissue_signal("T2", 1.0), flat, scanner, np.random.default_rng(2))
    mean = {contrast: {tissue: float(np.median(image[anatomy.labels == LABEL[tissue]])) for tissue in ("white", "grey", "csf", "tumour")}
            for contrast, image in (("T1", t1), ("T2", t2))}
    assert mean["T1"]["white"] > mean["T1"]["grey"] > mean["T1"]["csf"]
    assert mean["T2"]["csf"] > mean["T2"]["grey"] > mean["T2"]["white"]
    assert mean["T2"]["tumour"] > mean["T2"]["grey"] and mean["T1"]["tumour"] < mean["T1"]["grey"]  # lesion bright on T2 only
    assert tissue_signal("T2", 0.7)[LABEL["csf"]] < tissue_signal("T2", 1.0)[LABEL["csf"]]  # blended towards PD


def test_preprocessing_normalises_both_images_and_skips_slices_without_head(cases: list[dict[str, Any]]) -> None:
    case = {**cases[0], "image": cases[0]["image"].copy()}
    case["image"][:2] = case["image"].min()  # two slices of air only
    pair = preprocess_pair(case)
    assert pair.source.shape == pair.target.shape and pair.source.shape[1:] == (64, 64)
    assert 0 not in pair.slice_index and 1 not in pair.slice_index and len(pair.slice_index) >= 4
    for image in (pair.source, pair.target):
        assert image.min() == 0.0 and 0.9 < image.max() <= 1.0  # resampling smooths the brightest voxels a little
    assert DOMAIN.translate(DOMAIN.build_model(), case).shape == pair.source.shape
    with pytest.raises(ValueError, match=f"case {case['case_id']}: missing keys \\['images'\\]"):
        preprocess_pair({key: value for key, value in case.items() if key != "images"})


def test_counts_are_additive_and_identity_is_perfect(cases: list[dict[str, Any]]) -> None:
    torch.manual_seed(0)
    model = DOMAIN.build_model()
    whole = DOMAIN.evaluation_counts(model, cases)
    halves = add_counts(DOMAIN.evaluation_counts(model, cases[:1]), DOMAIN.evaluation_counts(model, cases[1:]))
    assert halves == whole and all(type(v) is int for v in whole.values())
    metrics = DOMAIN.metrics_from_counts(whole)
    assert set(whole) | set(metrics) == DOMAIN.evaluation_scalars
    assert metrics["psnr"] == pytest.approx(10 * np.log10(1 / metrics["mse"])) and 0 < metrics["psnr"] < PSNR_CAP_DB

    target = preprocess_pair(cases[0]).target
    perfect = metrics_from_counts(translation_counts(target, target))
    assert perfect["mse"] == 0.0 and perfect["mae"] == 0.0 and perfect["psnr"] == PSNR_CAP_DB
    assert perfect["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert all(np.isnan(v) for v in metrics_from_counts({}).values())


def test_batches_are_reproducible_and_flip_source_and_target_together(cases: list[dict[str, Any]]) -> None:
    first = list(DOMAIN.batches(cases[:1], 4, np.random.default_rng(7)))
    again = list(DOMAIN.batches(cases[:1], 4, np.random.default_rng(7)))
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(first, again))
    x, y = DOMAIN.training_samples(cases[:1])
    plain = DOMAIN.without_augmentation()
    assert plain.flip_prob is None
    pairs = {x[i, 0].tobytes(): (y[i, 0], False) for i in range(len(x))}
    pairs.update({np.ascontiguousarray(x[i, 0, :, ::-1]).tobytes(): (y[i, 0], True) for i in range(len(x))})
    flipped = []
    for xb, yb in first:
        for source, target in zip(xb[:, 0].numpy(), yb[:, 0].numpy()):
            expected, was_flipped = pairs[source.tobytes()]
            assert np.array_equal(target, expected[:, ::-1] if was_flipped else expected)
            flipped.append(was_flipped)
    assert len(flipped) == len(x) and 0 < sum(flipped) < len(x)


def test_mock_cases_copy_the_schema_and_no_pixel(cases: list[dict[str, Any]]) -> None:
    record = {**cases[0], "metadata": {**cases[0]["metadata"], "PatientAge": "045Y"}}
    entry = {"shape": list(record["image"].shape), "spacing": record["spacing"], "origin": record["origin"],
             "direction": record["direction"], "metadata": record["metadata"], "images": ["T2"]}
    [from_record] = DOMAIN.mock_cases([record], seed=1)
    [from_entry] = DOMAIN.mock_cases([entry], seed=1)
    # the pixels come from the seed alone: a template with pixels gives the same mock as one without
    assert np.array_equal(from_record["image"], from_entry["image"])
    assert np.array_equal(from_record["images"]["T2"], from_entry["images"]["T2"])
    assert from_entry["case_id"].startswith("mock-") and from_entry["metadata"]["PatientAge"] == ""
    assert from_entry["image"].shape == record["image"].shape and set(from_entry["images"]) == {"T2"}
    assert not np.array_equal(from_entry["image"], record["image"])
    assert np.isin(record["images"]["T2"], from_entry["images"]["T2"]).mean() < 0.01  # float coincidences only
    [no_images] = DOMAIN.mock_cases([{**entry, "images": []}])
    assert set(no_images["images"]) == {"T2"}
    assert len(DOMAIN.training_samples([from_entry])[0]) > 0


def test_short_training_beats_copying_the_source_on_held_out_cases_and_site() -> None:
    train = [case for site in ("hospital-a", "hospital-b", "hospital-c") for case in phantom_records(site, 3, seed=1, n_slices=10)]
    held_out = {
        "cases": [case for site in ("hospital-a", "hospital-b", "hospital-c") for case in phantom_records(site, 1, seed=99, n_slices=10)],
        "site": phantom_records("hospital-d", 3, seed=5, n_slices=10),
    }
    torch.manual_seed(0)
    model = DOMAIN.build_model()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(6):
        for x, y in DOMAIN.batches(train, 16, rng):
            optimiser.zero_grad()
            DOMAIN.loss(model(x), y).backward()
            optimiser.step()
    for name, cases in held_out.items():
        pairs = [preprocess_pair(case) for case in cases]
        baseline = metrics_from_counts(add_counts(*[translation_counts(p.source, p.target) for p in pairs]))
        trained = DOMAIN.metrics_from_counts(DOMAIN.evaluation_counts(model, cases))
        print(f"held-out {name}: trained PSNR {trained['psnr']:.2f} dB SSIM {trained['ssim']:.3f}; "
              f"source as prediction PSNR {baseline['psnr']:.2f} dB SSIM {baseline['ssim']:.3f}")
        assert trained["psnr"] > baseline["psnr"] + 3.0
        assert trained["ssim"] > baseline["ssim"] + 0.1

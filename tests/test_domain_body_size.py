"""The weight-and-height domain: phantom realism, preprocessing across clinics, pooled counts,
training that beats the mean, mocks without real values, DP-SGD readiness."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import domains
from domains.body_weight_height import (
    DOMAIN, PROFILES, BodyWeightHeight, FrameAugmentation, add_counts, error_counts, height_above_table, metrics_from_counts,
    model_input, phantom_fleet,
)
from domains.body_weight_height.body import Patient, Pose, fit_body
from domains.body_weight_height.metrics import COUNT_KEYS, METRIC_KEYS
from domains.body_weight_height.scene import Placement, body_coordinates, pixel_centres, render_depth
from domains.case_record import is_mock_case, make_case_record
from domains.case_manifest import mock_manifest

SMALL = (96, 40)  # rows x cols of the tests' frames: ~23 mm pixels, the clinics' fields of view


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny convolutions run fastest on one thread, and far slower on two when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(name: str):
    return PROFILES[name].with_size(*SMALL)


def records(name: str, n: int, seed: int, prefix: str) -> list[dict]:
    return [frame.as_record(f"{prefix}-{i}") for i, frame in enumerate(phantom_fleet(small(name), n, seed))]


def body_heights(profile, patient: Patient, pose: Pose = Pose(), placement: Placement = Placement(head_mm=200.0)) -> np.ndarray:
    """Height of the body itself above what it lies on, on the clinic's pixel grid (no camera)."""
    x, y = pixel_centres(profile)
    return fit_body(patient, pose).surface(*body_coordinates(x, y, placement, profile.table_length_mm))


def test_registry_returns_the_domain():
    assert "body_weight_height" in domains.DOMAINS
    domain = domains.get_domain("body_weight_height")
    assert domain is DOMAIN and isinstance(domain, domains.Domain)
    assert domain.primary_metric == "mae_kg" and domain.higher_is_better is False
    assert domain.evaluation_scalars == COUNT_KEYS | METRIC_KEYS


def test_heavier_patients_are_wider_and_thicker_and_taller_ones_longer():
    profile = PROFILES["clinic-a"]
    along, across = profile.pixel_spacing_mm
    light, heavy = (body_heights(profile, Patient(w, 175.0)) for w in (58.0, 110.0))
    assert heavy.max() > light.max() + 50  # the abdomen stands higher
    assert (heavy > 20).sum() > 1.2 * (light > 20).sum()  # a larger silhouette
    volume = [h.sum() * along * across / 1e6 for h in (light, heavy)]
    assert volume[1] / volume[0] == pytest.approx(110.0 / 58.0, rel=0.05)  # volume follows weight
    lengths = []
    for height in (155.0, 195.0):
        rows = np.flatnonzero((body_heights(profile, Patient(22.0 * (height / 100) ** 2, height)) > 20).any(axis=1))
        lengths.append((rows[-1] - rows[0] + 1) * along / 10)
    assert lengths[1] - lengths[0] == pytest.approx(40.0, abs=2 * along / 10)  # 40 cm taller, 40 cm longer


def test_weight_is_not_read_from_one_pixel_but_from_the_body():
    """No pixel of the model's input is a near-exact reading of weight; the volume above the table
    is the best single summary, better than the thickest point (blankets and cushions blur both)."""
    frames = [f for name in ("clinic-a", "clinic-c") for f in phantom_fleet(small(name), 25, 3)]
    weight = np.array([f.patient.weight_kg for f in frames])
    x = np.stack([model_input(f.as_record("x"))[0] for f in frames])
    pixels = x.reshape(len(x), -1)[:, x.reshape(len(x), -1).std(axis=0) > 0]
    best_pixel = np.max(np.abs([np.corrcoef(p, weight)[0, 1] for p in pixels.T]))
    heights = [height_above_table(f.depth) for f in frames]
    volume = np.corrcoef([h.sum() * np.prod(f.profile.pixel_spacing_mm) for h, f in zip(heights, frames)], weight)[0, 1]
    thickest = np.corrcoef([np.percentile(h, 99.5) for h in heights], weight)[0, 1]
    assert best_pixel < 0.95 and thickest < volume and volume > 0.9, (best_pixel, thickest, volume)


def test_clinics_differ_in_camera_table_sampling_and_readings():
    frames = {name: phantom_fleet(small(name), 6, 11) for name in PROFILES}
    table = {name: np.median([np.percentile(f.depth[f.depth > 0], 90) for f in fs]) for name, fs in frames.items()}
    missing = {name: np.mean([(f.depth == 0).mean() for f in fs]) for name, fs in frames.items()}
    assert max(table.values()) - min(table.values()) > 300  # camera hangs 0.3 m+ nearer the table at one clinic
    assert missing["clinic-c"] > 0.3 > missing["clinic-a"]  # the floor is out of clinic-c's range
    assert len({PROFILES[n].pixel_spacing_mm for n in PROFILES}) == len(PROFILES)
    assert any(f.placement.feet_first for f in phantom_fleet(small("clinic-d"), 12, 1))
    assert not any(f.placement.feet_first for f in phantom_fleet(small("clinic-a"), 12, 1))


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_clinic_sees_a_two_metre_patient_from_head_to_heels(name):
    profile = PROFILES[name]
    view = (profile.view_start_mm, profile.view_start_mm + profile.field_of_view_mm[0])
    head_first = (profile.head_position_mm[0], profile.head_position_mm[1] + 2000.0)
    feet_first = (profile.table_length_mm - profile.head_position_mm[1] - 2000.0, profile.table_length_mm - profile.head_position_mm[0])
    for first, last in (head_first, feet_first) if profile.feet_first else (head_first,):
        assert view[0] <= first and last <= view[1], (name, view, first, last)


def test_the_fleet_is_deterministic_and_frame_i_depends_only_on_seed_and_i():
    a, b = phantom_fleet(small("clinic-b"), 3, 5), phantom_fleet(small("clinic-b"), 5, 5)
    assert all(np.array_equal(x.depth, y.depth) and x.labels == y.labels for x, y in zip(a, b))
    assert not np.array_equal(a[0].depth, phantom_fleet(small("clinic-b"), 1, 6)[0].depth)


def test_preprocessing_leaves_the_same_body_at_every_clinic_alike():
    """One patient, lying the same way, seen by four clinics' cameras: after preprocessing their
    height maps differ far less than the cameras' distances do."""
    patient, pose = Patient(80.0, 178.0), Pose()
    body = fit_body(patient, pose)
    inputs, distances = [], []
    for name, profile in PROFILES.items():
        plain = replace(profile, headrest_mm=0.0, feet_first=0.0)
        depth = render_depth(plain, body, Placement(head_mm=250.0), np.random.default_rng(0))
        record = make_case_record(name, depth[None].astype(np.float32), None, (1.0, *plain.pixel_spacing_mm), (0, 0, 0),
                                  (1, 0, 0, 0, 1, 0, 0, 0, 1), {})
        inputs.append(model_input(record))
        distances.append(np.median(depth[depth > 0]))
    signal = np.mean([x.mean() for x in inputs])
    spread = np.mean([np.abs(x - inputs[0]).mean() for x in inputs[1:]])
    assert spread < 0.25 * signal, (spread, signal)
    assert np.ptp(distances) > 300


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_height_above_table_is_the_body_at_every_clinic(name):
    """The table found in the frame itself (clinic-d's camera is tilted 2 degrees, cradles curve
    15-55 mm, clinic-c reads no floor): the body's height above it within a few mm."""
    profile = replace(PROFILES[name], noise_mm=0.0, dropout=0.0, edge_dropout=0.0, headrest_mm=0.0)
    patient = Patient(70.0, 170.0)
    depth = render_depth(profile, fit_body(patient, Pose()), Placement(head_mm=200.0), np.random.default_rng(0))
    heights, truth = height_above_table(depth), body_heights(profile, patient)
    body = truth > 20
    assert np.abs(heights - truth)[body].mean() < 5.0 and np.abs(heights - truth)[~body].mean() < 2.0
    assert heights.sum() / truth.sum() == pytest.approx(1.0, abs=0.05)


def test_counts_of_two_halves_pool_exactly_into_the_counts_of_all():
    cases = records("clinic-a", 10, 2, "a")
    model = DOMAIN.build_model()
    whole = DOMAIN.evaluation_counts(model, cases)
    halves = add_counts(DOMAIN.evaluation_counts(model, cases[:4]), DOMAIN.evaluation_counts(model, cases[4:]))
    assert halves == whole and set(whole) == COUNT_KEYS and whole["n_cases"] == 10
    assert all(isinstance(v, int) for v in whole.values())
    assert set(DOMAIN.metrics_from_counts(whole)) == METRIC_KEYS


def test_metrics_from_counts_by_hand():
    predicted = np.array([[70.0, 170.0], [88.0, 160.0], [50.0, 200.0]])
    true = np.array([[72.0, 171.0], [80.0, 180.0], [60.0, 180.0]])
    metrics = metrics_from_counts(error_counts(predicted, true))
    assert metrics["mae_kg"] == pytest.approx((2 + 8 + 10) / 3)
    assert metrics["rmse_kg"] == pytest.approx(np.sqrt((4 + 64 + 100) / 3))
    assert metrics["mae_cm"] == pytest.approx((1 + 20 + 20) / 3)
    assert metrics["p10_weight"] == pytest.approx(2 / 3)  # 8/80 is within 10 %, 10/60 is not
    assert metrics["p20_weight"] == pytest.approx(1.0)
    assert metrics["p10_height"] == pytest.approx(1 / 3) and metrics["p20_height"] == pytest.approx(1.0)
    assert all(np.isnan(v) for v in metrics_from_counts(error_counts(np.zeros((0, 2)), np.zeros((0, 2)))).values())


def test_a_short_training_run_beats_predicting_the_mean_on_held_out_frames():
    train = [c for i, name in enumerate(("clinic-a", "clinic-b", "clinic-c", "clinic-d")) for c in records(name, 16, 20 + i, name)]
    held_out = [c for i, name in enumerate(("clinic-a", "clinic-d")) for c in records(name, 15, 90 + i, f"t-{name}")]
    truth = np.array([[c["labels"]["weight_kg"], c["labels"]["height_cm"]] for c in held_out])
    mean = np.mean([[c["labels"]["weight_kg"], c["labels"]["height_cm"]] for c in train], axis=0)
    baseline = np.abs(truth - mean).mean(axis=0)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = DOMAIN.build_model()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = DOMAIN.training_samples(train)  # preprocessed once; `batches` does the same per epoch
    for _ in range(40):
        for start in range(0, len(x), 16):
            order = rng.permutation(len(x))[:16]
            xb, yb = DOMAIN.augmented(torch.from_numpy(x[order]), torch.from_numpy(y[order]), rng)
            optimiser.zero_grad()
            DOMAIN.loss(model(xb), yb).backward()
            optimiser.step()
    metrics = DOMAIN.metrics_from_counts(DOMAIN.evaluation_counts(model, held_out))
    print(f"held-out MAE {metrics['mae_kg']:.2f} kg / {metrics['mae_cm']:.2f} cm, P10 weight {metrics['p10_weight']:.2f}; "
          f"predict-the-mean MAE {baseline[0]:.2f} kg / {baseline[1]:.2f} cm")
    assert metrics["mae_kg"] < 0.7 * baseline[0]
    weight, height = DOMAIN.predict(model, held_out[0])
    assert 20 < weight < 250 and 120 < height < 230


def test_batches_cover_every_frame_once_and_augmentation_is_reproducible_and_optional():
    cases = records("clinic-b", 5, 4, "b")
    x, y = DOMAIN.training_samples(cases)
    first = list(DOMAIN.batches(cases, 2, np.random.default_rng(3)))
    again = list(DOMAIN.batches(cases, 2, np.random.default_rng(3)))
    assert [len(b[0]) for b in first] == [2, 2, 1] and first[0][0].shape[1:] == (1, 128, 48)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert sorted(torch.cat([b[1] for b in first])[:, 0].tolist()) == sorted(y[:, 0].tolist())
    plain = DOMAIN.without_augmentation()
    assert plain.augmentation is None and DOMAIN.augmentation is not None
    unaugmented = torch.cat([b[0] for b in plain.batches(cases, 5, np.random.default_rng(3))])
    assert sorted(unaugmented.sum(dim=(1, 2, 3)).tolist()) == pytest.approx(sorted(x.sum(axis=(1, 2, 3)).tolist()))
    frames = torch.from_numpy(x)
    flipped = BodyWeightHeight(augmentation=FrameAugmentation(1.0, 1.0, 0)).augmented(frames, torch.from_numpy(y), np.random.default_rng(0))[0]
    assert torch.equal(flipped, frames.flip(2).flip(3)) and torch.equal(frames, torch.from_numpy(x))


def test_cases_without_labels_are_refused_naming_the_case_and_the_labels():
    case = records("clinic-a", 1, 1, "a")[0]
    del case["labels"]
    with pytest.raises(ValueError, match=r"case a-0: labels lack \['weight_kg', 'height_cm'\]"):
        DOMAIN.training_samples([case])
    assert len(DOMAIN.predict(DOMAIN.build_model(), case)) == 2  # prediction needs no labels


def test_mock_cases_copy_the_manifest_schema_and_carry_no_real_value():
    real = records("clinic-c", 2, 8, "case")
    real[0]["metadata"].update(PatientSex="F", PatientWeight=93.0)
    entries = [{"case_id": c["case_id"], "patient": "patient-x", "split": "train", "labelled": True, "shape": list(c["image"].shape),
                "spacing": c["spacing"], "origin": c["origin"], "direction": c["direction"], "metadata": c["metadata"],
                "labels": c["labels"], "has_mask": False} for c in real]
    mocks = DOMAIN.mock_cases(mock_manifest(entries), seed=1)
    assert all(np.array_equal(a["image"], b["image"]) and a["labels"] == b["labels"]
               for a, b in zip(mocks, DOMAIN.mock_cases(mock_manifest(entries), seed=1)))
    for mock, case in zip(mocks, real):
        assert is_mock_case(mock) and mock["image"].shape == case["image"].shape and mock["spacing"] == case["spacing"]
        assert set(mock["metadata"]) == set(case["metadata"]) and not np.array_equal(mock["image"], case["image"])
        assert set(mock["labels"]) == {"weight_kg", "height_cm"} and mock["labels"] != case["labels"]
        assert 30 < mock["labels"]["weight_kg"] < 200 and 140 < mock["labels"]["height_cm"] < 210
    assert mocks[0]["metadata"]["PatientSex"] == "" and mocks[0]["metadata"]["PatientWeight"] == ""
    assert "93" not in json.dumps(mocks[0]["metadata"])
    assert DOMAIN.metrics_from_counts(DOMAIN.evaluation_counts(DOMAIN.build_model(), mocks))["mae_kg"] >= 0


def test_the_model_trains_under_dp_sgd():
    from datasite_setup.site_tasks.dp_sgd import dp_sgd_problem, train_dp_sgd

    model = DOMAIN.build_model()
    assert dp_sgd_problem(DOMAIN, model) is None
    before = [p.detach().clone() for p in model.parameters()]
    run = train_dp_sgd(model, DOMAIN, records("clinic-a", 6, 3, "a"), torch.optim.SGD(model.parameters(), lr=0.1), epochs=1,
                       batch_size=3, max_steps=2, noise_multiplier=1.0, max_grad_norm=1.0, rng=np.random.default_rng(0), entropy=1)
    assert run.steps == 2 and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_each_frame_is_preprocessed_once_and_a_changed_frame_again(monkeypatch: pytest.MonkeyPatch) -> None:
    import domains.body_weight_height as body_domain

    calls = []
    real = body_domain.model_input
    monkeypatch.setattr(body_domain, "model_input", lambda case, grid: calls.append(case["case_id"]) or real(case, grid))
    domain = body_domain.BodyWeightHeight()
    cases = records("clinic-a", 3, 5, "prep")
    first, _ = domain.training_samples(cases)
    again, _ = domain.training_samples(cases)  # another epoch
    domain.predictions(domain.build_model(), cases)  # an evaluation of the same frames
    assert len(calls) == 3 and np.array_equal(first, again)
    changed = {**cases[0], "image": cases[0]["image"] + 50.0}  # same case id, other pixels
    x, _ = domain.training_samples([changed])
    assert len(calls) == 4 and not np.array_equal(x[0], first[0])

"""The radiomics and landmark site tasks in-process: geometry, aggregation, parameter checks (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from datasite_setup.site_tasks import TASKS, SiteFacts, run_installed_task
from datasite_setup.site_tasks.radiomics_aggregates import case_features, sitk_image

SETTINGS = {"imageType": {"Original": {}}, "featureClass": {"shape": None, "firstorder": None}, "setting": {"binWidth": 10}}
SITE = SiteFacts(min_cohort=2)


def make_case(seed: int, lesion: bool = True, manufacturer: str = "GE") -> dict:
    """An oblique, anisotropic grid: spacing (z, y, x) all different, rotated direction, offset origin."""
    rng = np.random.default_rng(seed)
    image = rng.normal(200 + 20 * seed, 15, (10, 24, 20)).astype(np.float32)
    mask = np.zeros(image.shape, np.uint8)
    if lesion:
        mask[3:7, 6:14 + seed, 5:12] = 1
        image[mask > 0] += 100
    angle = np.deg2rad(20)
    direction = [np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0]
    return {
        "case_id": f"c{seed}", "image": image, "mask": mask, "spacing": [4.0, 0.8, 0.6],
        "origin": [-12.5, 30.0, 100.25], "direction": direction,
        "metadata": {"Manufacturer": manufacturer, "MagneticFieldStrength": 1.5, "SliceThickness": 3.9999},
    }


def test_the_site_builds_images_on_the_case_grid() -> None:
    case = make_case(1)
    image = sitk_image(case["image"], case)
    assert image.GetSize() == (20, 24, 10)
    assert image.GetSpacing() == pytest.approx((0.6, 0.8, 4.0))
    assert image.GetOrigin() == pytest.approx(tuple(case["origin"]))
    assert image.GetDirection() == pytest.approx(tuple(case["direction"]))
    # the physical position of voxel (x=2, y=3, z=4) follows the DICOM affine
    affine = np.array(case["direction"]).reshape(3, 3) * np.array([0.6, 0.8, 4.0])
    assert image.TransformIndexToPhysicalPoint((2, 3, 4)) == pytest.approx(tuple(affine @ [2, 3, 4] + case["origin"]))


def test_case_features_are_pyradiomics_features_and_shape_sees_the_voxel_size() -> None:
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    case = make_case(2)
    ours = case_features(case, SETTINGS)
    assert not any(name.startswith("diagnostics_") for name in ours)
    reference = RadiomicsFeatureExtractor(SETTINGS).execute(sitk_image(case["image"], case), sitk_image(case["mask"], case))
    assert ours == {k: pytest.approx(float(v)) for k, v in reference.items() if not k.startswith("diagnostics_")}
    assert ours["original_shape_VoxelVolume"] == pytest.approx(case["mask"].sum() * 4.0 * 0.8 * 0.6)
    assert ours["original_firstorder_Mean"] == pytest.approx(float(case["image"][case["mask"] > 0].mean()), rel=1e-5)


def test_run_returns_aggregates_of_the_case_features_and_skips_empty_masks() -> None:
    cases = [make_case(0), make_case(1), make_case(3, lesion=False), make_case(4, manufacturer="Philips")]
    params = {"settings": SETTINGS, "intensity_edges": [0.0, 200.0, 300.0, 400.0, 600.0],
              "feature_edges": {"original_firstorder_Mean": [250.0, 300.0, 350.0, 400.0]}}
    result = run_installed_task("radiomics_aggregates", cases, params, min_cohort=2)
    per_case = [case_features(c, SETTINGS) for c in cases if c["mask"].any()]
    assert result["n"] == 3 and result["skipped_empty_mask"] == 1 and result["skipped_unusable"] == 0
    mean = result["features"]["original_firstorder_Mean"]
    values = np.array([f["original_firstorder_Mean"] for f in per_case])
    assert mean["n"] == 3 and mean["mean"] == pytest.approx(values.mean()) and mean["var"] == pytest.approx(values.var(ddof=1))
    assert mean["hist"].tolist() == np.histogram(values, params["feature_edges"]["original_firstorder_Mean"])[0].tolist()
    pooled = np.concatenate([c["image"][c["mask"] > 0] for c in cases if c["mask"].any()])
    assert result["intensity"]["counts"].tolist() == np.histogram(pooled, params["intensity_edges"])[0].tolist()
    assert result["acquisition"]["Manufacturer"] == {"GE": {"n": 2}, "Philips": {"n": 1}}  # the parent suppresses
    assert result["acquisition"]["SliceThickness"] == {"4": {"n": 3}}
    TASKS["radiomics_aggregates"].contract(params, SITE).check(
        {**result, "acquisition": {"Manufacturer": {"GE": {"n": 2}}}})


def test_with_dp_each_case_value_is_clipped_to_the_declared_bounds() -> None:
    cases = [make_case(0), make_case(1)]
    dp = {"epsilon": 1.0, "mechanism": "laplace", "bounds": {"original_firstorder_Mean": [0.0, 250.0]}}
    result = run_installed_task("radiomics_aggregates", cases, {"settings": SETTINGS, "dp": dp}, min_cohort=2)
    assert result["features"]["original_firstorder_Mean"]["mean"] == 250.0  # both lesions are brighter
    assert result["features"]["original_firstorder_Mean"]["var"] == 0.0


def test_nyul_harmonization_standardizes_each_image_before_extraction() -> None:
    from analyses.harmonization.nyul import DEFAULT_PERCENTILES, case_landmarks, fit_standard_scale, standardize, StandardScale

    cases = [make_case(0), make_case(1)]
    summary = run_installed_task("intensity_landmarks", cases, {}, min_cohort=2)
    assert summary["n"] == 2 and summary["mean"].shape == (len(DEFAULT_PERCENTILES),)
    expected = np.array([case_landmarks(c["image"], None, DEFAULT_PERCENTILES) for c in cases])
    assert summary["mean"] == pytest.approx(expected.mean(axis=0)) and summary["var"] == pytest.approx(expected.var(axis=0, ddof=1))
    TASKS["intensity_landmarks"].contract({}, SITE).check(summary)

    scale = fit_standard_scale({"site": summary})
    params = {"settings": SETTINGS, "harmonization": {"nyul": scale.to_params()}}
    assert TASKS["radiomics_aggregates"].problems(params) == []
    result = run_installed_task("radiomics_aggregates", cases, params, min_cohort=2)
    restored = StandardScale.from_params(scale.to_params())
    standardized = [
        case_features({**c, "image": standardize(c["image"], case_landmarks(c["image"], None, restored.percentiles), restored).astype(np.float32)}, SETTINGS)
        for c in cases
    ]
    values = [f["original_firstorder_Median"] for f in standardized]
    assert result["features"]["original_firstorder_Median"]["mean"] == pytest.approx(np.mean(values))
    assert 0 <= result["features"]["original_firstorder_Median"]["mean"] <= 110


@pytest.mark.parametrize(
    "params, words",
    [
        ({"settings": {"setting": {"binWidth": -1}}}, "binWidth"),
        ({"settings": {"featureClass": {"nonsense": None}}}, "nonsense"),
        ({"settings": {"voxelArrays": True}}, "voxelArrays"),
        ({"settings": {}, "intensity_edges": [3.0, 1.0]}, "strictly increasing"),
        ({"settings": {}, "intensity_edges": list(range(600))}, "bin edges"),
        ({"settings": {}, "feature_edges": {"f": [1.0]}}, "'f'"),
        ({"settings": {}, "harmonization": {"combat": {}}}, "nyul"),
        ({"settings": {}, "harmonization": {"nyul": {"percentiles": [1, 99], "landmarks": [5, 1], "scale": [0, 100]}}}, "increasing"),
        ({"settings": {}, "dp": {"epsilon": 1.0, "mechanism": "laplace"}}, "bounds"),
        ({"settings": {}, "group_by": "Manufacturer"}, "unknown parameter"),
    ],
)
def test_bad_parameters_are_refused_before_anything_runs(params: dict, words: str) -> None:
    problems = " ".join(TASKS["radiomics_aggregates"].problems(params))
    assert words in problems, problems


def test_landmark_percentiles_are_checked() -> None:
    task = TASKS["intensity_landmarks"]
    assert task.problems({"percentiles": [1, 50, 99]}) == []
    assert "increasing" in " ".join(task.problems({"percentiles": [50, 1]}))
    assert "[0, 100]" in " ".join(task.problems({"percentiles": [1, 150]}))


def test_the_example_mr_parameter_file_is_valid() -> None:
    from pathlib import Path

    from analyses.commands.radiomics import read_params

    settings, federated = read_params(Path(__file__).resolve().parents[1] / "analyses" / "radiomics_params" / "mr_default.yaml")
    assert set(settings["featureClass"]) == {"shape", "firstorder", "glcm"}
    assert TASKS["radiomics_aggregates"].problems({"settings": settings, **federated}) == []


def test_cli_refuses_bad_input_with_exit_code_2_before_contacting_any_site(tmp_path, capsys) -> None:
    from analyses.cli import main

    federation = tmp_path / "fed.toml"
    federation.write_text('[[datasites]]\nname = "a"\nurl = "http://127.0.0.1:1"\nemail = "ds@uni.example"\npassword_env = "X"\n')
    params = tmp_path / "params.yaml"
    for content, words in (("setting: {binWidth: -1}\n", "binWidth"), ("federated: {harmonize: pooled}\n", "harmonize"),
                           ("federated: {harmonize: combat, combat_covariates: {continuous: [PatientName]}}\n",
                            "combat_covariates"),
                           ("- not a mapping\n", "mapping")):
        params.write_text(content)
        assert main(["radiomics", str(federation), "--params", str(params), "--out", str(tmp_path / "o")]) == 2
        assert words in capsys.readouterr().out
    assert main(["radiomics", str(tmp_path / "missing.toml"), "--params", str(params), "--out", str(tmp_path / "o")]) == 2


# ---- no parameter selects cases; the release says which cases entered what ---------------------------


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"setting": {"minimumROISize": 100}}, "minimumROISize"),
        ({"setting": {"minimumROIDimensions": 3}}, "minimumROIDimensions"),
        ({"setting": {"resegmentRange": [0, 300]}}, "resegmentRange"),
        ({"setting": {"label": 2}}, "'label' must be 1"),
        ({"imageType": {"Original": {"minimumROISize": 100}}}, "minimumROISize"),
    ],
)
def test_settings_that_decide_which_lesions_enter_are_refused(settings: dict, words: str) -> None:
    problems = " ".join(TASKS["radiomics_aggregates"].problems({"settings": settings}))
    assert words in problems, problems
    assert TASKS["combat_statistics"].problems({"settings": settings, "features": ["f"], "stage": "moments"})
    assert TASKS["radiomics_aggregates"].problems({"settings": {"setting": {"label": 1}}}) == []


def test_a_case_pyradiomics_refuses_refuses_the_whole_run() -> None:
    from datasite_setup.site_tasks import TaskRefusal

    tiny = make_case(5)
    tiny["mask"][:] = 0
    tiny["mask"][5, 10, 8] = 1  # one voxel: pyradiomics cannot describe it
    with pytest.raises(TaskRefusal, match="pyradiomics refused case #2"):
        run_installed_task("radiomics_aggregates", [make_case(0), make_case(1), tiny], {"settings": SETTINGS}, min_cohort=2)


def test_the_release_names_the_cases_behind_each_feature_bin_and_voxel_bin() -> None:
    cases = [make_case(0), make_case(3, lesion=False), make_case(1), make_case(4)]
    edges = [250.0, 330.0, 400.0]
    params = {"settings": SETTINGS, "intensity_edges": [0.0, 290.0, 1000.0],
              "feature_edges": {"original_firstorder_Mean": edges}}
    release = TASKS["radiomics_aggregates"].run_with_cohorts(cases, params, SITE)
    by_path = {c.path: c for c in release.cohorts}
    mean = by_path[("features", "original_firstorder_Mean")]
    assert mean.quantity == "lesion_mean_intensity" and mean.cases == (0, 2, 3)
    assert by_path[("features", "original_shape_Elongation")].quantity == "radiomics_feature/original_shape_Elongation"
    values = {i: case_features(cases[i], SETTINGS)["original_firstorder_Mean"] for i in (0, 2, 3)}
    hist = release.result["features"]["original_firstorder_Mean"]["hist"]
    for b in np.flatnonzero(hist):
        members = by_path[("features", "original_firstorder_Mean", "hist", str(b))]
        assert members.quantity == "lesion_mean_intensity/bins" and len(members.cases) == hist[b]
        assert all(edges[b] <= values[i] < edges[b + 1] for i in members.cases)
    assert by_path[("intensity",)].cases == (0, 2, 3)
    for b in (0, 1):
        assert by_path[("intensity", "counts", str(b))].quantity is None  # a sum of voxels: bins cleanser only
        contributors = by_path[("intensity", "counts", str(b))].cases
        assert contributors == tuple(i for i in (0, 2, 3) if np.histogram(cases[i]["image"][cases[i]["mask"] > 0],
                                                                           params["intensity_edges"])[0][b])

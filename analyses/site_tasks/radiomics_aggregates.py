"""Site task `radiomics_aggregates`: pyradiomics features of each case's lesion, released as aggregates only.

For every case, the image and its mask become SimpleITK images on the case's own grid (spacing,
origin and direction exactly as ingested) and pyradiomics runs with the request's settings: the
content of a pyradiomics parameter file, checked against pyradiomics' own schema before anything
runs. Optionally each image is first mapped onto a Nyul standard intensity scale fitted across
the sites (`harmonization = {"nyul": StandardScale.to_params()}`).

What the task returns (never a per-case value):

- "n": cases used; "skipped_empty_mask": cases whose mask is empty (no lesion to describe) and
  "skipped_unusable": cases pyradiomics refuses (e.g. a lesion of one voxel or one slice);
- "features": per numeric feature, {"n", "mean", "var" (ddof=1)} over the cases where pyradiomics
  gave a finite value, and "hist", the count of cases per bin of the request's fixed edges
  (`feature_edges`; values outside the edges are not counted);
- "intensity": {"n", "counts"}, the histogram of the masked voxels pooled over the cases, on the
  request's `intensity_edges`;
- "acquisition": per field (Manufacturer, model, field strength, slice thickness rounded to 0.1),
  {value: {"n": cases}}.

Which of this may leave the site (groups smaller than the minimum cohort, sparse histogram bins,
differential-privacy noise) is decided in one place, `datasite_setup.disclosure`, applied by the
site's parent process to whatever this task returns. With `dp`, the task's only part is to clip
each feature to the request's declared bounds before aggregating, which is what makes the noise
calibrated there sufficient.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from analyses.site_tasks.task import Param, SiteFacts, SiteTask

MAX_BINS = 512
ACQUISITION_FIELDS = ("Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "SliceThickness")
_ROUNDED_FIELDS = {"MagneticFieldStrength", "SliceThickness"}


# ---- parameter checks (run in the site's server before anything is executed) --------------------------


def settings_problems(settings: dict[str, Any]) -> str | None:
    """What pyradiomics' own parameter schema refuses in `settings`, or None."""
    import pykwalify.core
    from radiomics import getParameterValidationFiles

    logging.getLogger("pykwalify").setLevel(logging.CRITICAL)
    schema, functions = getParameterValidationFiles()
    try:
        pykwalify.core.Core(source_data=settings, schema_files=[schema], extensions=[functions]).validate(raise_exception=True)
    except Exception as exc:  # pykwalify raises SchemaError, the schema's own functions ValueError/TypeError
        return f"not a valid pyradiomics parameter set: {getattr(exc, 'msg', exc)}".strip()
    return None


def edges_problems(edges: Any) -> str | None:
    """Histogram edges must be 2 to MAX_BINS + 1 finite, strictly increasing numbers."""
    if not isinstance(edges, (list, tuple)) or not 2 <= len(edges) <= MAX_BINS + 1:
        return f"must be a list of 2 to {MAX_BINS + 1} bin edges"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in edges):
        return "bin edges must be finite numbers"
    if any(b <= a for a, b in zip(edges, edges[1:])):
        return "bin edges must be strictly increasing"
    return None


def feature_edges_problems(feature_edges: dict[str, Any]) -> str | None:
    for name, edges in feature_edges.items():
        if issue := edges_problems(edges):
            return f"'{name}': {issue}"
    return None


def harmonization_problems(harmonization: dict[str, Any]) -> str | None:
    """Only {"nyul": StandardScale.to_params()} is known."""
    from analyses.harmonization.nyul import StandardScale

    if set(harmonization) != {"nyul"}:
        return "must be {'nyul': <StandardScale.to_params()>}"
    try:
        scale = StandardScale.from_params(harmonization["nyul"])
    except (KeyError, TypeError, ValueError) as exc:
        return f"'nyul' is not a standard scale: {exc}"
    if any(b <= a for a, b in zip(scale.landmarks, scale.landmarks[1:])):
        return "'nyul' landmarks must be strictly increasing"
    return None


def dp_problems(dp: dict[str, Any]) -> str | None:
    from datasite_setup.disclosure import dp_problems as problems

    return problems(dp)


# The two parameters every task that extracts features declares (combat_statistics too).
SETTINGS_PARAM = Param(dict, "pyradiomics parameter set (imageType, featureClass, setting)", check=settings_problems)
HARMONIZATION_PARAM = Param(dict, "{'nyul': standard scale} applied to each image first", required=False,
                            check=harmonization_problems)


# ---- per case --------------------------------------------------------------------------------------


def sitk_image(array: np.ndarray, case: dict[str, Any]) -> Any:
    """A SimpleITK image of a [Z,Y,X] array on the case's grid (SimpleITK takes spacing as x, y, z)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(v) for v in reversed(case["spacing"])])
    image.SetOrigin([float(v) for v in case["origin"]])
    image.SetDirection([float(v) for v in case["direction"]])
    return image


def feature_extractor(settings: dict[str, Any]) -> Any:
    import radiomics
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    radiomics.setVerbosity(logging.ERROR)
    return RadiomicsFeatureExtractor(settings)


def extract(extractor: Any, case: dict[str, Any]) -> dict[str, float]:
    """The numeric features of one case (pyradiomics' diagnostics_* entries dropped)."""
    values = extractor.execute(sitk_image(case["image"], case), sitk_image(case["mask"], case))
    return {name: float(value) for name, value in values.items() if not name.startswith("diagnostics_")}


def case_features(case: dict[str, Any], settings: dict[str, Any]) -> dict[str, float]:
    """One case's features, as the site computes them; for tests only: the site never returns these."""
    return extract(feature_extractor(settings), case)


def standardized(case: dict[str, Any], scale: Any) -> dict[str, Any]:
    from analyses.harmonization.nyul import case_landmarks, standardize

    landmarks = case_landmarks(case["image"], None, scale.percentiles)
    return {**case, "image": standardize(case["image"], landmarks, scale).astype(np.float32)}


def _acquisition_value(metadata: dict[str, Any], field: str) -> str:
    value = metadata.get(field)
    if value is None or value == "":
        return "unknown"
    if field in _ROUNDED_FIELDS and isinstance(value, (int, float)):
        return f"{round(float(value), 1):g}"
    return str(value)


# ---- aggregation -----------------------------------------------------------------------------------


def _summary(values: np.ndarray, edges: list[float] | None) -> dict[str, Any]:
    group: dict[str, Any] = {
        "n": int(values.size),
        "mean": float(values.mean()),
        "var": float(values.var(ddof=1)) if values.size > 1 else 0.0,
    }
    if edges is not None:
        group["hist"] = np.histogram(values, bins=np.asarray(edges, dtype=float))[0].astype(np.int64)
    return group


def run(cases: list[dict[str, Any]], params: dict[str, Any], site: SiteFacts) -> dict[str, Any]:
    from analyses.harmonization.nyul import StandardScale

    extractor = feature_extractor(params["settings"])
    scale = StandardScale.from_params(params["harmonization"]["nyul"]) if "harmonization" in params else None
    intensity_edges = params.get("intensity_edges")
    bounds = params.get("dp", {}).get("bounds", {})
    per_feature: dict[str, list[float]] = {}
    counts = np.zeros(len(intensity_edges) - 1, np.int64) if intensity_edges else None
    acquisition: dict[str, dict[str, int]] = {field: {} for field in ACQUISITION_FIELDS}
    used = empty = 0
    for case in cases:
        if not np.any(case["mask"]):
            empty += 1
            continue
        if scale is not None:
            case = standardized(case, scale)
        try:
            values = extract(extractor, case)
        except ValueError:  # pyradiomics' refusal of an ROI too small for the settings
            continue
        used += 1
        for name, value in values.items():
            per_feature.setdefault(name, []).append(value)
        if counts is not None:
            counts += np.histogram(case["image"][case["mask"] > 0], bins=np.asarray(intensity_edges, float))[0]
        for field in ACQUISITION_FIELDS:
            key = _acquisition_value(case["metadata"], field)
            acquisition[field][key] = acquisition[field].get(key, 0) + 1

    feature_edges = params.get("feature_edges", {})
    features = {}
    for name, values in sorted(per_feature.items()):
        finite = np.array([v for v in values if math.isfinite(v)], dtype=float)
        if finite.size:
            if name in bounds:
                finite = np.clip(finite, *bounds[name])
            features[name] = _summary(finite, feature_edges.get(name))
    result: dict[str, Any] = {
        "n": used,
        "skipped_empty_mask": empty,
        "skipped_unusable": len(cases) - used - empty,
        "features": features,
        "acquisition": {field: {k: {"n": c} for k, c in sorted(groups.items())} for field, groups in acquisition.items()},
    }
    if counts is not None:
        result["intensity"] = {"n": used, "counts": counts}
    return result


def contract(params: dict[str, Any], site: SiteFacts) -> Any:
    from datasite_setup.output_contracts import AggregatesContract

    return AggregatesContract(min_cohort=site.min_cohort, max_array_len=MAX_BINS)


TASK = SiteTask(
    name="radiomics_aggregates",
    summary="pyradiomics features of the lesions: per-feature n/mean/variance/histogram, intensity histogram, "
    "acquisition counts (aggregates only)",
    params={
        "settings": SETTINGS_PARAM,
        "intensity_edges": Param(list, "bin edges of the masked-voxel intensity histogram", required=False,
                                 check=edges_problems),
        "feature_edges": Param(dict, "feature name -> bin edges of its per-case histogram", required=False,
                               check=feature_edges_problems),
        "harmonization": HARMONIZATION_PARAM,
        "dp": Param(dict, "differential privacy: epsilon, mechanism, delta, bounds per feature", required=False,
                    check=dp_problems),
    },
    run=run,
    contract=contract,
    notes=(
        "Per-case feature values never leave: they are aggregated inside the isolated run.",
        "Small groups, sparse bins and differential-privacy noise are handled by datasite_setup.disclosure.",
    ),
)

"""Site task `radiomics_aggregates`: pyradiomics features of each case's lesion, released as aggregates only.

For every case, the image and its mask become SimpleITK images on the case's own grid (spacing,
origin and direction exactly as ingested) and pyradiomics runs with the request's settings: the
content of a pyradiomics parameter file, checked against pyradiomics' own schema before anything
runs. Optionally each image is first mapped onto a Nyul standard intensity scale fitted across
the sites (`harmonization = {"nyul": StandardScale.to_params()}`).

What the task returns (never a per-case value):

- "n": cases used; "skipped_empty_mask": cases whose mask is empty (no lesion to describe: a fact
  of the data set that no parameter changes) and "skipped_unusable", always 0: a run in which
  pyradiomics refuses a case (e.g. a lesion of one voxel or one slice) is refused as a whole,
  because settings that leave one case out would let two runs be differenced into it;
- "features": per numeric feature, {"n", "mean", "var" (ddof=1)} over the cases where pyradiomics
  gave a finite value, and "hist", the count of cases per bin of the request's fixed edges
  (`feature_edges`; values outside the edges are not counted);
- "intensity": {"n", "counts"}, the histogram of the masked voxels pooled over the cases, on the
  request's `intensity_edges`;
- "acquisition": per field (Manufacturer, model, field strength, slice thickness rounded to 0.1),
  {value: {"n": cases}}.

No parameter selects cases: the pyradiomics settings that decide which lesions are analysed
(`minimumROISize`, `minimumROIDimensions`, resegmentation, a mask label other than 1) are the
site's, and a request naming them is refused. Privately, the task reports which cases entered each
feature, each histogram bin and the voxel histogram (`task.Release`), for the release ledger.

Which of this may leave the site (groups smaller than the minimum cohort, sparse histogram bins,
differential-privacy noise, releases that differ from earlier ones by a few cases) is decided in
one place, `datasite_setup.disclosure`, applied by the site's parent process to whatever this task
returns. With `dp`, the task's only part is to clip each feature to the request's declared bounds
before aggregating, which is what makes the noise calibrated there sufficient.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from typing import Any

import numpy as np

from datasite_setup.site_tasks.harmonized_cases import HARMONIZATION_PARAM, standardized
from datasite_setup.site_tasks.task import (
    Cohort, Param, Release, SiteFacts, SiteTask, TaskRefusal, feature_quantity,
)

MAX_BINS = 512
ACQUISITION_FIELDS = ("Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "SliceThickness")
_ROUNDED_FIELDS = {"MagneticFieldStrength", "SliceThickness"}
# pyradiomics settings that decide whether a lesion is analysed at all, or which voxels form it
CASE_SELECTING_SETTINGS = ("minimumROISize", "minimumROIDimensions", "label_channel", "resegmentRange",
                           "resegmentMode", "resegmentShape")
LESION_LABEL = 1  # ingestion writes every mask with the lesion as 1
VOXEL_INTENSITIES = "lesion_voxel_intensities"


# ---- parameter checks (run in the site's server before anything is executed) --------------------------


@functools.lru_cache(maxsize=1)
def _parameter_schema() -> tuple[dict[str, Any], str]:
    """pyradiomics' parameter schema, parsed once per process (it is checked on every call)."""
    import yaml
    from radiomics import getParameterValidationFiles

    schema, functions = getParameterValidationFiles()
    with open(schema) as handle:
        return yaml.safe_load(handle), functions


def settings_problems(settings: dict[str, Any]) -> str | None:
    """What pyradiomics' own parameter schema refuses in `settings`, or None."""
    import pykwalify.core

    logging.getLogger("pykwalify").setLevel(logging.CRITICAL)
    schema, functions = _parameter_schema()
    try:
        pykwalify.core.Core(source_data=settings, schema_data=copy.deepcopy(schema), extensions=[functions]).validate(
            raise_exception=True)
    except Exception as exc:  # pykwalify raises SchemaError, the schema's own functions ValueError/TypeError
        return f"not a valid pyradiomics parameter set: {getattr(exc, 'msg', exc)}".strip()
    return case_selection_problems(settings)


def case_selection_problems(settings: dict[str, Any]) -> str | None:
    """Settings that would let a request choose which cases enter (the site fixes them), or None.

    Bisecting `minimumROISize` between two runs leaves exactly one case out of the second, and the
    difference of the two releases is that case's features; every setting that can drop a lesion,
    or re-draw which voxels form it, is therefore the site's alone (general or per image type).
    """
    sections = [settings.get("setting")] + list((settings.get("imageType") or {}).values())
    for section in sections:
        if not isinstance(section, dict):
            continue
        chosen = sorted(key for key in section if key in CASE_SELECTING_SETTINGS)
        if chosen:
            return f"'{chosen[0]}' decides which lesions are analysed, which only the site may decide; remove it"
        if section.get("label", LESION_LABEL) != LESION_LABEL:
            return f"'label' must be {LESION_LABEL}: the site's masks mark each lesion with {LESION_LABEL}"
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


def dp_problems(dp: dict[str, Any]) -> str | None:
    from datasite_setup.disclosure import dp_problems as problems

    return problems(dp)


# The two parameters every task that extracts features declares (combat_statistics too).
SETTINGS_PARAM = Param(dict, "pyradiomics parameter set (imageType, featureClass, setting)", check=settings_problems)


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
    # setVerbosity sets only pyradiomics' own handler: its logger stays at INFO and builds a dozen
    # records per case (each frame lookup an audit event in the sandbox) that nothing shows.
    radiomics.logger.setLevel(logging.ERROR)
    return RadiomicsFeatureExtractor(settings)


def extract(extractor: Any, case: dict[str, Any]) -> dict[str, float]:
    """The numeric features of one case (pyradiomics' diagnostics_* entries dropped)."""
    values = extractor.execute(sitk_image(case["image"], case), sitk_image(case["mask"], case))
    return {name: float(value) for name, value in values.items() if not name.startswith("diagnostics_")}


def case_features(case: dict[str, Any], settings: dict[str, Any]) -> dict[str, float]:
    """One case's features, as the site computes them; for tests only: the site never returns these."""
    return extract(feature_extractor(settings), case)


def _acquisition_value(metadata: dict[str, Any], field: str) -> str:
    value = metadata.get(field)
    if value is None or value == "":
        return "unknown"
    if field in _ROUNDED_FIELDS and isinstance(value, (int, float)):
        return f"{round(float(value), 1):g}"
    return str(value)


# ---- aggregation -----------------------------------------------------------------------------------


def _bins(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """Each value's bin on `edges` as np.histogram counts it (last bin closed), -1 outside the edges."""
    edges_array = np.asarray(edges, dtype=float)
    index = np.searchsorted(edges_array, values, side="right") - 1
    index[values == edges_array[-1]] = edges_array.size - 2
    index[(values < edges_array[0]) | (values > edges_array[-1])] = -1
    return index


def _feature(name: str, positions: np.ndarray, values: np.ndarray, edges: list[float] | None) -> tuple[dict[str, Any], list[Cohort]]:
    """A feature's group over the cases at `positions`, with the cohorts of the group and of each bin."""
    quantity = feature_quantity(name)
    group: dict[str, Any] = {
        "n": int(values.size),
        "mean": float(values.mean()),
        "var": float(values.var(ddof=1)) if values.size > 1 else 0.0,
    }
    cohorts = [Cohort(("features", name), quantity, tuple(int(p) for p in positions))]
    if edges is not None:
        index = _bins(values, edges)
        group["hist"] = np.bincount(index[index >= 0], minlength=len(edges) - 1).astype(np.int64)
        for b in np.flatnonzero(group["hist"]):
            cohorts.append(Cohort(("features", name, "hist", str(b)), f"{quantity}/bins",
                                  tuple(int(p) for p in positions[index == b])))
    return group, cohorts


def release(cases: list[dict[str, Any]], params: dict[str, Any], site: SiteFacts) -> Release:
    from datasite_setup.harmonization.nyul import StandardScale

    extractor = feature_extractor(params["settings"])
    scale = StandardScale.from_params(params["harmonization"]["nyul"]) if "harmonization" in params else None
    intensity_edges = params.get("intensity_edges")
    bounds = params.get("dp", {}).get("bounds", {})
    per_feature: dict[str, list[tuple[int, float]]] = {}
    voxel_counts: list[np.ndarray] = []
    acquisition: dict[str, dict[str, int]] = {field: {} for field in ACQUISITION_FIELDS}
    used: list[int] = []
    for i, case in enumerate(cases):
        if not np.any(case["mask"]):
            continue
        if scale is not None:
            case = standardized(case, scale)
        try:
            values = extract(extractor, case)
        except ValueError as exc:  # pyradiomics' refusal of an ROI too small for the settings
            raise TaskRefusal(f"pyradiomics refused case #{i} with these settings ({exc}); "
                              "the site releases no analysis that leaves a lesion out") from None
        used.append(i)
        for name, value in values.items():
            per_feature.setdefault(name, []).append((i, value))
        if intensity_edges:
            voxel_counts.append(np.histogram(case["image"][case["mask"] > 0], bins=np.asarray(intensity_edges, float))[0])
        for field in ACQUISITION_FIELDS:
            key = _acquisition_value(case["metadata"], field)
            acquisition[field][key] = acquisition[field].get(key, 0) + 1

    feature_edges = params.get("feature_edges", {})
    features, cohorts = {}, []
    for name, entries in sorted(per_feature.items()):
        finite = [(i, v) for i, v in entries if math.isfinite(v)]
        if finite:
            positions = np.array([i for i, _ in finite], dtype=np.int64)
            values = np.array([v for _, v in finite], dtype=float)
            if name in bounds:
                values = np.clip(values, *bounds[name])
            features[name], feature_cohorts = _feature(name, positions, values, feature_edges.get(name))
            cohorts += feature_cohorts
    result: dict[str, Any] = {
        "n": len(used),
        "skipped_empty_mask": len(cases) - len(used),
        "skipped_unusable": 0,
        "features": features,
        "acquisition": {field: {k: {"n": c} for k, c in sorted(groups.items())} for field, groups in acquisition.items()},
    }
    if intensity_edges:
        per_case = np.array(voxel_counts, np.int64).reshape(len(used), len(intensity_edges) - 1)
        result["intensity"] = {"n": len(used), "counts": per_case.sum(axis=0)}
        cohorts.append(Cohort(("intensity",), VOXEL_INTENSITIES, tuple(used)))
        for b in np.flatnonzero(result["intensity"]["counts"]):
            contributors = tuple(used[k] for k in np.flatnonzero(per_case[:, b]))
            cohorts.append(Cohort(("intensity", "counts", str(b)), None, contributors))
    return Release(result, tuple(cohorts))


def run(cases: list[dict[str, Any]], params: dict[str, Any], site: SiteFacts) -> dict[str, Any]:
    return release(cases, params, site).result


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
    release=release,
    contract=contract,
    notes=(
        "Per-case feature values never leave: they are aggregated inside the isolated run.",
        "Small groups, sparse bins and differential-privacy noise are handled by datasite_setup.disclosure.",
    ),
)

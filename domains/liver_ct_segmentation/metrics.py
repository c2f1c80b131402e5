"""Liver CT metrics as the programmes report them: per test patient (then averaged) and pooled.

A site returns additive integers only, so that sites can be summed before any metric is taken:
- voxel confusion counts per structure (`liver_tp`, ...; liver is the organ envelope, labels >= 1,
  lesions included; lesion is label 2), from which the pooled metrics follow exactly;
- per-patient metrics summed in parts per million with the number of patients (`liver_dice_sum_ppm`,
  `patients`), from which the mean over patients follows exactly, whichever sites the patients
  are at - the way FedNorm and most clinical papers average "over test patients";
- patient-level lesion detection (a patient with any lesion voxel vs a prediction of at least
  `MIN_LESION_MM3`, a lesion of ~6 mm diameter, so that a few stray voxels are not a finding):
  `detection_tp`, ..., whose sensitivity, specificity and F1 are what a reader of "per-patient
  sensitivity / specificity / F1" expects (the voxel specificity of any usable liver mask is
  ~0.99, most of a volume being background);
- liver HD95 as a micrometre sum and a case count (`segmentation_metrics.hd95_counts`), each
  case's HD95 capped at `MAX_HD95_MM` (a grid's diagonal for an empty prediction otherwise).

A site that noises evaluations (`[privacy.evaluation_dp]`) releases only the counts one patient
moves by a bounded amount (`EVALUATION_BOUNDS`): the per-patient sums, detection and HD95. The
voxel confusion counts are withheld there, since one patient's liver is a hundred thousand voxels
and noise that hides it would hide everything, so the pooled metrics are absent
(`metrics_from_counts` takes the counts it is given).
Per patient, voxel F1 equals Dice (both are 2TP / (2TP + FP + FN)); `liver_f1` is reported under
its own name for readers who look for it. Conventions for empty denominators follow
`domains.segmentation_metrics` (an empty prediction of an empty structure scores 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from domains.segmentation_metrics import confusion_counts, hd95_counts

STRUCTURES = ("liver", "lesion")
PER_PATIENT = ("dice", "sensitivity", "specificity")
MIN_LESION_MM3 = 100.0
PPM = 1_000_000
MAX_HD95_MM = 100.0  # a liver boundary further off than this counts as this far off

COUNT_KEYS = (
    tuple(f"{s}_{k}" for s in STRUCTURES for k in ("tp", "fp", "tn", "fn"))
    + tuple(f"{s}_{m}_sum_ppm" for s in STRUCTURES for m in PER_PATIENT)
    + ("patients", "liver_hd95_sum_um", "liver_hd95_cases", "detection_tp", "detection_fp", "detection_tn", "detection_fn")
)
VOXEL_COUNT_KEYS = tuple(f"{s}_{k}" for s in STRUCTURES for k in ("tp", "fp", "tn", "fn"))
# The most one patient adds to each count (0: the same for every patient; voxel counts: withheld).
EVALUATION_BOUNDS = {
    "patients": 0.0, "liver_hd95_cases": 0.0, "liver_hd95_sum_um": MAX_HD95_MM * 1000,
    **{f"{s}_{m}_sum_ppm": float(PPM) for s in STRUCTURES for m in PER_PATIENT},
    **{f"detection_{k}": 1.0 for k in ("tp", "fp", "tn", "fn")},
}
METRIC_KEYS = (
    tuple(f"{s}_{m}" for s in STRUCTURES for m in (*PER_PATIENT, "f1"))
    + tuple(f"{s}_{m}_pooled" for s in STRUCTURES for m in (*PER_PATIENT, "f1"))
    + ("liver_hd95_mm", "detection_sensitivity", "detection_specificity", "detection_f1")
)


def structure_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Binary masks of each reported structure from a label map (0 background, 1 liver, 2 lesion)."""
    return {"liver": labels >= 1, "lesion": labels == 2}


def _ratio(numerator: int, denominator: int) -> float:
    return 1.0 if denominator == 0 else numerator / denominator


def _binary_metrics(counts: dict[str, int], prefix: str = "") -> dict[str, float]:
    tp, fp, tn, fn = (int(counts[f"{prefix}{k}"]) for k in ("tp", "fp", "tn", "fn"))
    precision, sensitivity = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"dice": _ratio(2 * tp, 2 * tp + fp + fn), "sensitivity": sensitivity, "specificity": _ratio(tn, tn + fp),
            "f1": 0.0 if precision + sensitivity == 0 else 2 * precision * sensitivity / (precision + sensitivity)}


def case_counts(predicted: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, int]:
    """Every count of one patient: label maps `predicted` and `truth` [Z, Y, X] on the case's grid."""
    counts: dict[str, int] = {"patients": 1}
    predicted_masks, true_masks = structure_masks(predicted), structure_masks(truth)
    for structure in STRUCTURES:
        confusion = confusion_counts(predicted_masks[structure], true_masks[structure])
        counts.update({f"{structure}_{k}": v for k, v in confusion.items()})
        for name, value in _binary_metrics(confusion).items():
            if name in PER_PATIENT:
                counts[f"{structure}_{name}_sum_ppm"] = int(round(value * PPM))
    hd95 = hd95_counts(predicted_masks["liver"], true_masks["liver"], spacing)
    counts.update(liver_hd95_sum_um=min(hd95["hd95_sum_um"], int(MAX_HD95_MM * 1000)), liver_hd95_cases=hd95["hd95_cases"])
    has_lesion = bool(true_masks["lesion"].any())
    voxel_mm3 = float(np.prod([float(v) for v in spacing]))
    found = np.count_nonzero(predicted_masks["lesion"]) * voxel_mm3 >= MIN_LESION_MM3
    counts.update(detection_tp=int(has_lesion and found), detection_fp=int(found and not has_lesion),
                  detection_tn=int(not (found or has_lesion)), detection_fn=int(has_lesion and not found))
    return counts


def add_counts(*counts: dict[str, int]) -> dict[str, int]:
    """Counts summed key by key (over the patients of a site, or over sites)."""
    return {key: sum(int(c.get(key, 0)) for c in counts) for key in COUNT_KEYS}


def metrics_from_counts(counts: dict[str, int]) -> dict[str, float]:
    """Per-patient means, mean liver HD95, patient-level lesion detection and, when the voxel
    counts are there (they are withheld by sites that noise evaluations), the pooled metrics."""
    missing = [key for key in COUNT_KEYS if key not in counts and key not in VOXEL_COUNT_KEYS]
    if missing:
        raise KeyError(f"liver CT counts lack {missing}")
    if min(int(value) for key, value in counts.items() if key in COUNT_KEYS) < 0:
        raise ValueError("liver CT counts must be non-negative")
    patients = int(counts["patients"])
    metrics: dict[str, float] = {}
    for structure in STRUCTURES:
        for name in PER_PATIENT:
            total = min(int(counts[f"{structure}_{name}_sum_ppm"]), patients * PPM)  # noised sums may exceed it
            metrics[f"{structure}_{name}"] = total / PPM / patients if patients else 1.0
        metrics[f"{structure}_f1"] = metrics[f"{structure}_dice"]  # a patient's voxel F1 is its Dice
        if all(f"{structure}_{k}" in counts for k in ("tp", "fp", "tn", "fn")):
            metrics.update({f"{structure}_{name}_pooled": value for name, value in _binary_metrics(counts, f"{structure}_").items()})
    if int(counts["liver_hd95_cases"]):
        metrics["liver_hd95_mm"] = int(counts["liver_hd95_sum_um"]) / 1000 / int(counts["liver_hd95_cases"])
    detection = _binary_metrics(counts, "detection_")
    metrics.update(detection_sensitivity=detection["sensitivity"], detection_specificity=detection["specificity"],
                   detection_f1=detection["f1"])
    return metrics

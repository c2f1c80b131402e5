"""Evaluation of translation as additive integers, and PSNR / SSIM / MAE / MSE from them.

Sites release counts, not metrics, so that counts summed over sites give the pooled metric exactly
(`domains.domain`). Errors are on the [0, 1] scale of `preprocessing` and summed per slice in
fixed point (nano-units, `FIXED_POINT`); each slice's sum is rounded on its own before adding, so
any split of the slices (two halves of a site, several sites) adds up to the same integers.

- mae, mse: pooled over every voxel of every counted slice (background included: a generator
  that paints noise into air is wrong there);
- psnr = 10 log10(1 / mse) (data range 1) of the pooled mse, not a mean of per-slice PSNRs, which
  one near-perfect slice would dominate; an exact match (mse 0) gives `PSNR_CAP_DB` rather than
  infinity, which JSON and averages across runs cannot carry; any real error lies far below it;
- ssim: the mean over slices of each slice's SSIM (MONAI, Gaussian window 11, data range 1).
Nothing counted gives NaN metrics rather than a perfect-looking score.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

FIXED_POINT = 1_000_000_000
PSNR_CAP_DB = 100.0
COUNT_KEYS = ("n_slices", "n_voxels", "abs_error_nano", "sq_error_nano", "ssim_nano")
METRIC_KEYS = ("mae", "mse", "psnr", "ssim")


def slice_ssim(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """SSIM of each slice pair, float64 [N], for [N, H, W] arrays on [0, 1]."""
    from monai.metrics import SSIMMetric

    if len(prediction) == 0:
        return np.zeros(0, dtype=np.float64)
    metric = SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")
    values = metric(torch.as_tensor(prediction, dtype=torch.float32)[:, None], torch.as_tensor(target, dtype=torch.float32)[:, None])
    return values.double().numpy().reshape(-1)


def translation_counts(prediction: np.ndarray, target: np.ndarray) -> dict[str, int]:
    """Additive counts of synthesised slices against their targets, both [N, H, W] on [0, 1]."""
    if prediction.shape != target.shape or prediction.ndim != 3:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} must both be [N, H, W] of one shape")
    error = prediction.astype(np.float64) - target.astype(np.float64)
    abs_sums = np.abs(error).sum(axis=(1, 2))
    sq_sums = (error**2).sum(axis=(1, 2))
    return {
        "n_slices": int(len(error)),
        "n_voxels": int(error.size),
        "abs_error_nano": int(np.rint(abs_sums * FIXED_POINT).astype(np.int64).sum()),
        "sq_error_nano": int(np.rint(sq_sums * FIXED_POINT).astype(np.int64).sum()),
        "ssim_nano": int(np.rint(slice_ssim(prediction, target) * FIXED_POINT).astype(np.int64).sum()),
    }


def add_counts(*counts: Mapping[str, int]) -> dict[str, int]:
    """Counts of several case sets (or sites) summed: the counts of their union."""
    return {key: sum(int(c.get(key, 0)) for c in counts) for key in COUNT_KEYS}


def metrics_from_counts(counts: Mapping[str, int]) -> dict[str, float]:
    """mae, mse, psnr (dB) and ssim from (pooled) counts."""
    n_voxels, n_slices = int(counts.get("n_voxels", 0)), int(counts.get("n_slices", 0))
    if n_voxels == 0 or n_slices == 0:
        return {key: float("nan") for key in METRIC_KEYS}
    mse = int(counts["sq_error_nano"]) / FIXED_POINT / n_voxels
    psnr = PSNR_CAP_DB if mse <= 0 else min(PSNR_CAP_DB, 10.0 * math.log10(1.0 / mse))
    return {
        "mae": int(counts["abs_error_nano"]) / FIXED_POINT / n_voxels,
        "mse": mse,
        "psnr": psnr,
        "ssim": int(counts["ssim_nano"]) / FIXED_POINT / n_slices,
    }

"""Training patches: fixed-size 3-D crops of preprocessed cases, sampled by label class.

A whole abdomen does not fit a CPU batch, and most of it is neither liver nor lesion: uniform
crops would teach "background" and rarely show a lesion. Each patch is therefore centred on a
voxel of a class drawn with `class_ratios` (background, liver, lesion) - MONAI's
`RandCropByLabelClasses`, the positive/negative sampling of nnU-Net-style pipelines; a class a
case lacks (a lesion-free liver) is skipped for that case. Patches of all cases are shuffled
together, so a batch mixes patients.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from domains.liver_ct_segmentation.preprocessing import PreprocessedCT


@dataclass(frozen=True)
class PatchSampling:
    """`patch_size` (z, y, x) voxels, divisible by 8 for the U-Net's three poolings;
    `patches_per_case` per epoch; `class_ratios` weights the centre's class (background, liver,
    lesion): lesions are small, so they are drawn as often as background and liver together."""

    patch_size: tuple[int, int, int] = (32, 48, 48)
    patches_per_case: int = 4
    class_ratios: tuple[float, float, float] = (1.0, 1.0, 2.0)

    def __post_init__(self) -> None:
        if any(n % 8 or n < 8 for n in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size}: every side must be a positive multiple of 8 (three poolings)")
        if self.patches_per_case < 1:
            raise ValueError(f"patches_per_case must be at least 1, got {self.patches_per_case}")


DEFAULT_SAMPLING = PatchSampling()


def case_patches(case: PreprocessedCT, sampling: PatchSampling, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`patches_per_case` crops of one case: image float32 and labels float32, both [N, 1, z, y, x];
    none (N = 0) for a case without a voxel of any sampled class (a pseudo-label whose teacher was
    unsure everywhere)."""
    from monai.transforms import RandCropByLabelClassesd

    if case.mask is None:
        raise ValueError("a training case needs a mask (labels or pseudo-labels)")
    sampled = [label for label, ratio in enumerate(sampling.class_ratios) if ratio > 0]
    if not np.isin(case.mask, sampled).any():
        empty = np.zeros((0, 1, *sampling.patch_size), np.float32)
        return empty, empty.copy()
    cropper = RandCropByLabelClassesd(
        keys=["image", "label"], label_key="label", spatial_size=sampling.patch_size, ratios=list(sampling.class_ratios),
        num_classes=len(sampling.class_ratios), num_samples=sampling.patches_per_case, warn=False,
    )
    cropper.set_random_state(seed=int(rng.integers(2**31)))
    data = {"image": torch.from_numpy(case.image)[None], "label": torch.from_numpy(case.mask.astype(np.float32))[None]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        crops = cropper(data)
    images = np.stack([np.asarray(c["image"], dtype=np.float32) for c in crops])
    labels = np.stack([np.asarray(c["label"], dtype=np.float32) for c in crops])
    return images, labels


def patch_batches(cases: Sequence[PreprocessedCT], sampling: PatchSampling, batch_size: int,
                  rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch: `patches_per_case` patches of every case, shuffled across cases, as (x, y) tensors
    [B, 1, z, y, x] (y holds the label values 0, 1, 2); the last batch may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    sampled = [case_patches(case, sampling, rng) for case in cases]
    x = np.concatenate([images for images, _ in sampled])
    y = np.concatenate([labels for _, labels in sampled])
    order = rng.permutation(len(x))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield torch.from_numpy(x[chosen]), torch.from_numpy(y[chosen])

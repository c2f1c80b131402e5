"""Liver and liver-lesion segmentation on abdominal CT with a 3-D U-Net (MONAI).

`DOMAIN` is what the orchestrator uses (see `domains.domain.Domain`). A case record's mask is a
label map: 0 background, 1 liver, 2 lesion (a binary mask trains the organ only, e.g. a tumour
contour of a real CT smoke test). The pieces are public so benchmarks and demos can reuse them:
`preprocessing` (orientation, resampling to millimetres, HU window, body crop), `patches`
(class-balanced 3-D patches), `metrics` (per-patient and pooled, additive), `mock_cases`,
`phantom` (a multi-vendor abdominal CT fleet) and `phantom_dicom` (its cases written as DICOM CT
with SEG / RTSTRUCT masks).
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from domains.case_record import check_case_record, record_affine
from domains.liver_ct_segmentation.metrics import (
    COUNT_KEYS, EVALUATION_BOUNDS, METRIC_KEYS, add_counts, case_counts, metrics_from_counts,
)
from domains.liver_ct_segmentation.mock_cases import mock_cases
from domains.liver_ct_segmentation.patches import DEFAULT_SAMPLING, PatchSampling, patch_batches
from domains.liver_ct_segmentation.phantom import generate_case, phantom_fleet
from domains.liver_ct_segmentation.phantom_dicom import write_phantom_site
from domains.liver_ct_segmentation.preprocessing import DEFAULT_PREPROCESSING, CTPreprocessing, PreprocessedCT, preprocess_ct
from domains.liver_ct_segmentation.scanner_profiles import PROFILES, CTScannerProfile

__all__ = [
    "DEFAULT_PREPROCESSING",
    "DEFAULT_SAMPLING",
    "DOMAIN",
    "IGNORE",
    "LABELS",
    "PROFILES",
    "CTPreprocessing",
    "CTScannerProfile",
    "LiverCTSegmentation",
    "PatchSampling",
    "PreprocessedCT",
    "generate_case",
    "phantom_fleet",
    "preprocess_ct",
    "write_phantom_site",
]

LABELS = ("background", "liver", "lesion")
IGNORE = 255  # a mask value the loss skips: a voxel the teacher of a pseudo-label was unsure of


def largest_organ(labels: np.ndarray) -> np.ndarray:
    """`labels` with every liver-or-lesion voxel outside the largest connected (26-neighbour)
    liver-or-lesion component set to background."""
    from scipy import ndimage

    components, count = ndimage.label(labels > 0, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return labels
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return np.where(components == np.argmax(sizes), labels, 0).astype(labels.dtype)


class LiverCTSegmentation:
    """A 3-D U-Net (MONAI `UNet`, instance norm, residual units) with three output classes, trained
    with Dice + cross-entropy on class-balanced patches of preprocessed cases and evaluated by
    sliding-window inference (Gaussian-weighted overlapping patches) mapped back onto each case's
    own grid, where the hospital's mask is."""

    name = "liver_ct_segmentation"
    evaluation_scalars = frozenset(COUNT_KEYS) | frozenset(METRIC_KEYS)
    primary_metric = "liver_dice"
    evaluation_bounds = EVALUATION_BOUNDS  # what one patient adds to each released count at most (noised evaluations)
    higher_is_better = True

    # Preprocessed training cases kept (a few MB each at 4 mm): a run's epochs and a simulation's
    # rounds would otherwise resample the same scans again and again.
    PREPARED_CASES = 64

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32, 64), preprocessing: CTPreprocessing = DEFAULT_PREPROCESSING,
                 sampling: PatchSampling = DEFAULT_SAMPLING, sw_batch_size: int = 4, sw_overlap: float = 0.25,
                 pseudo_label_confidence: float = 0.9) -> None:
        if tuple(preprocessing.min_shape) != tuple(sampling.patch_size):
            raise ValueError(f"preprocessing pads cases to {preprocessing.min_shape} but patches are {sampling.patch_size}; "
                             "give both the same size")
        self.channels = tuple(channels)
        self.preprocessing = preprocessing
        self.sampling = sampling
        self.sw_batch_size = sw_batch_size
        self.sw_overlap = sw_overlap
        self.pseudo_label_confidence = pseudo_label_confidence
        self._prepared: OrderedDict[tuple[str, bytes], PreprocessedCT] = OrderedDict()
        self._prepared_lock = threading.Lock()

    def build_model(self) -> torch.nn.Module:
        from monai.networks.nets import UNet

        return UNet(spatial_dims=3, in_channels=1, out_channels=len(LABELS), channels=self.channels,
                    strides=(2,) * (len(self.channels) - 1), num_res_units=1, norm="instance")

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Dice (per patch over the liver and lesion channels) + cross-entropy of a batch
        [B, 3, z, y, x] against labels [B, 1, z, y, x], over the voxels not marked `IGNORE`: MONAI's
        `DiceCELoss` where every voxel counts."""
        from monai.losses import DiceLoss

        valid = target != IGNORE
        labels = torch.where(valid, target, torch.zeros_like(target)).long()[:, 0]
        weight = valid[:, 0].to(logits.dtype)
        cross_entropy = (torch.nn.functional.cross_entropy(logits, labels, reduction="none") * weight).sum() / weight.sum().clamp(min=1)
        one_hot = torch.nn.functional.one_hot(labels, len(LABELS)).movedim(-1, 1).to(logits.dtype) * weight[:, None]
        dice = DiceLoss(include_background=False)(torch.softmax(logits, dim=1) * weight[:, None], one_hot)
        return dice + cross_entropy

    def batches(self, cases: Sequence[dict[str, Any]], batch_size: int, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch: `sampling.patches_per_case` class-balanced patches of every case, x float32
        [B, 1, z, y, x] in [0, 1] and y float32 labels [B, 1, z, y, x]."""
        if not len(cases):
            raise ValueError("no cases given; a site needs at least one case to train on")
        processed = []
        for case in cases:
            check_case_record(case, require=("mask",))
            processed.append(self.prepared_case(case))
        return patch_batches(processed, self.sampling, batch_size, rng)

    def prepared_case(self, case: dict[str, Any]) -> PreprocessedCT:
        """`preprocess_ct` of a training case, computed once per content: keyed by the case id and a
        digest of its image, mask (a pseudo-label changes with its teacher) and geometry, so every
        epoch after the first skips the resampling, and a changed case never shares an entry."""
        digest = hashlib.blake2b(digest_size=16)
        for array in (case["image"], case["mask"], record_affine(case)):
            digest.update(np.ascontiguousarray(array).tobytes())
        key = (str(case.get("case_id")), digest.digest())
        with self._prepared_lock:
            if key in self._prepared:
                self._prepared.move_to_end(key)
                return self._prepared[key]
        prepared = preprocess_ct(case, self.preprocessing)
        with self._prepared_lock:
            self._prepared[key] = prepared
            while len(self._prepared) > self.PREPARED_CASES:
                self._prepared.popitem(last=False)
        return prepared

    def predict_probabilities(self, model: torch.nn.Module, case: dict[str, Any]) -> np.ndarray:
        """Class probabilities float32 [3, Z, Y, X] on the case's own grid; air cropped away before
        the model is background."""
        from monai.inferers import sliding_window_inference

        processed = preprocess_ct(case, self.preprocessing, with_mask=False)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                logits = sliding_window_inference(torch.from_numpy(processed.image)[None, None], self.sampling.patch_size,
                                                  self.sw_batch_size, model, overlap=self.sw_overlap, mode="gaussian")
        finally:
            model.train(was_training)
        probabilities = torch.softmax(logits[0], dim=0).numpy()
        back = processed.to_original_grid(probabilities)
        outside = back.sum(axis=0) < 0.5
        back[0][outside] = 1.0
        return back

    def predict_mask(self, model: torch.nn.Module, case: dict[str, Any]) -> np.ndarray:
        """Label map uint8 [Z, Y, X] (0 background, 1 liver, 2 lesion) on the case's own grid."""
        return np.argmax(self.predict_probabilities(model, case), axis=0).astype(np.uint8)

    def pseudo_label(self, model: torch.nn.Module, case: dict[str, Any]) -> np.ndarray:
        """A teacher's label map for an unlabelled case: `predict_mask` reduced to its largest
        connected liver (with the lesions in it), and `IGNORE` wherever the teacher's top class is
        below `pseudo_label_confidence`. A student fitted to every voxel of a teacher learns its
        mistakes back; a weak teacher's mistakes are islands away from the liver (the liver is one
        organ, so they become background) and unsure voxels (organ borders, lesions it half sees),
        which are left out of the loss."""
        probabilities = self.predict_probabilities(model, case)
        labels = largest_organ(np.argmax(probabilities, axis=0).astype(np.uint8))
        labels[probabilities.max(axis=0) < self.pseudo_label_confidence] = IGNORE
        return labels

    def evaluation_counts(self, model: torch.nn.Module, cases: Sequence[dict[str, Any]]) -> dict[str, int]:
        """Per-structure voxel counts, per-patient metric sums, liver HD95 and lesion detection
        over `cases`, one case in memory at a time."""
        per_case = []
        for case in cases:
            check_case_record(case, require=("mask",))
            per_case.append(case_counts(self.predict_mask(model, case), np.asarray(case["mask"]), case["spacing"]))
        return add_counts(*per_case)

    def metrics_from_counts(self, counts: dict[str, int]) -> dict[str, float]:
        return metrics_from_counts(counts)

    def mock_cases(self, templates: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
        return mock_cases(templates, seed)


DOMAIN = LiverCTSegmentation()

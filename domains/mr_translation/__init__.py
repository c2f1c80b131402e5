"""Image-to-image translation of MR contrasts (T1 -> T2 synthesis) on axial slices.

A case's source is its primary image and its target is its one further image, as ingestion with
`--primary-series-description T1` makes them (T1 the image, the T2 series of the same frame of
reference `images["T2"]`). `DOMAIN` satisfies `domains.domain.Domain` and, for matched averaging
(FedMA), `domains.channel_widths.ChannelWidths`; the modules below are its parts:

- `anatomy`, `contrasts`, `sites`, `phantom`: the paired-contrast phantom fleet (four hospitals
  whose scanners and T1/T2 protocols differ), written as DICOM or made in memory;
- `preprocessing`: per-case [0, 1] normalisation, in-plane resampling, fixed-size slices;
- `generator`: the 2-D U-Net and its channel layout; `loss`: L1 + (1 - SSIM);
- `metrics`: additive evaluation counts, PSNR / SSIM / MAE / MSE from them;
- `augmentation`: left-right flips; `mock_cases`: synthetic paired mocks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from domains.channel_widths import ChannelGroup, Layout, width_problem
from domains.mr_translation.augmentation import FLIP_PROB, flip_pairs
from domains.mr_translation.generator import BASE_WIDTHS, CHANNEL_GROUPS, GROUPS, MAX_WIDTHS, TranslationUNet, channel_layout
from domains.mr_translation.loss import L1_WEIGHT, TranslationLoss
from domains.mr_translation.metrics import COUNT_KEYS, METRIC_KEYS, PSNR_CAP_DB, add_counts, metrics_from_counts, translation_counts
from domains.mr_translation.mock_cases import mock_cases
from domains.mr_translation.phantom import PairedPhantom, generate_pair, phantom_records, write_phantom_site
from domains.mr_translation.preprocessing import DEFAULT_SETTINGS, PairedSlices, TranslationSettings, preprocess_pair, source_and_target
from domains.mr_translation.sites import PROFILES, PairedProfile
from domains.shuffled_batches import shuffled_batches

__all__ = [
    "DEFAULT_SETTINGS",
    "DOMAIN",
    "GROUPS",
    "PROFILES",
    "PSNR_CAP_DB",
    "MRTranslation",
    "PairedPhantom",
    "PairedProfile",
    "PairedSlices",
    "TranslationLoss",
    "TranslationSettings",
    "TranslationUNet",
    "add_counts",
    "channel_layout",
    "generate_pair",
    "metrics_from_counts",
    "mock_cases",
    "phantom_records",
    "preprocess_pair",
    "source_and_target",
    "translation_counts",
    "write_phantom_site",
]


class MRTranslation:
    """T1 -> T2 (or any source -> target pair) synthesis with `TranslationUNet`, trained with
    `TranslationLoss` on preprocessed slice pairs, left-right flipped at random unless built
    without augmentation, evaluated on every usable slice of each case."""

    name = "mr_translation"
    evaluation_scalars = frozenset({*COUNT_KEYS, *METRIC_KEYS})
    primary_metric = "psnr"
    higher_is_better = True
    base_widths: Mapping[str, int] = BASE_WIDTHS
    max_widths: Mapping[str, int] = MAX_WIDTHS
    channel_groups: tuple[ChannelGroup, ...] = CHANNEL_GROUPS

    def __init__(self, settings: TranslationSettings = DEFAULT_SETTINGS, flip_prob: float | None = FLIP_PROB,
                 l1_weight: float = L1_WEIGHT, eval_batch_size: int = 32) -> None:
        self.settings = settings
        self.flip_prob = flip_prob
        self.l1_weight = l1_weight
        self.eval_batch_size = eval_batch_size
        self._loss = TranslationLoss(l1_weight)

    def build_model(self, widths: Mapping[str, int] | None = None) -> torch.nn.Module:
        """The generator at `widths` (None: `base_widths`); widths outside base..max are refused."""
        if widths is None:
            return TranslationUNet(self.base_widths)
        problem = width_problem(self, widths)
        if problem is not None:
            raise ValueError(f"{self.name}: {problem}")
        return TranslationUNet(widths)

    def channel_layout(self, widths: Mapping[str, int]) -> Layout:
        return channel_layout(widths)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._loss(prediction, target)

    def training_samples(self, cases: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Every usable slice pair of `cases` once, source x and target y float32 [N, 1, H, W],
        one case preprocessed at a time (one slice is DP-SGD's unit of privacy)."""
        if not len(cases):
            raise ValueError("no cases given; a site needs at least one paired case to train on")
        pairs = [preprocess_pair(case, self.settings) for case in cases]
        x = np.concatenate([p.source for p in pairs])[:, None]
        y = np.concatenate([p.target for p in pairs])[:, None]
        if not len(x):
            raise ValueError(f"none of the {len(cases)} case(s) has a slice showing the head; nothing to train on")
        return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.float32)

    def batches(self, cases: Sequence[dict[str, Any]], batch_size: int, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of (source, target) slices [B, 1, H, W] in an order drawn from `rng`, each
        pair flipped left-right at random (same rng) unless built without augmentation."""
        x, y = self.training_samples(cases)
        batches = shuffled_batches(x, y, batch_size, rng)
        if not self.flip_prob:
            return batches
        return (self.augmented(xb, yb, rng) for xb, yb in batches)

    def augmented(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of `training_samples` augmented as `batches` augments its batches."""
        return flip_pairs(x, y, rng, self.flip_prob) if self.flip_prob else (x, y)

    def without_augmentation(self) -> MRTranslation:
        """The same domain training on the slices as they are."""
        return MRTranslation(self.settings, flip_prob=None, l1_weight=self.l1_weight, eval_batch_size=self.eval_batch_size)

    def translate(self, model: torch.nn.Module, case: dict[str, Any]) -> np.ndarray:
        """The synthesised target float32 [N, H, W] of the case's usable slices, on the grid of
        `preprocess_pair(case)`, whose `source` and `target` are the matching normalised inputs."""
        return self._predict(model, preprocess_pair(case, self.settings).source)

    def _predict(self, model: torch.nn.Module, source: np.ndarray) -> np.ndarray:
        if not len(source):
            return np.zeros_like(source)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = [model(torch.from_numpy(source[i : i + self.eval_batch_size, None]).to(device)).cpu()
                       for i in range(0, len(source), self.eval_batch_size)]
        finally:
            model.train(was_training)
        return torch.cat(out)[:, 0].numpy().astype(np.float32)

    def evaluation_counts(self, model: torch.nn.Module, cases: Sequence[dict[str, Any]]) -> dict[str, int]:
        """Additive counts (`metrics`) over every usable slice of `cases`, one case in memory at a time."""
        per_case = []
        for case in cases:
            pair = preprocess_pair(case, self.settings)
            per_case.append(translation_counts(self._predict(model, pair.source), pair.target))
        return add_counts(*per_case)

    def metrics_from_counts(self, counts: dict[str, int]) -> dict[str, float]:
        return metrics_from_counts(counts)

    def mock_cases(self, templates: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
        return mock_cases(templates, seed)


DOMAIN = MRTranslation()

"""Patient weight and height from a depth camera over the CT table: a federated regression domain.

A CT vendor estimates each patient's weight (for dose and contrast) and height from a 3-D camera
above the table, and wants the estimate trained across clinics without their frames leaving them.
A case is one depth frame (image [1, rows, cols], mm from the camera; `frame_files` says how
clinics file them) with labels `weight_kg` and `height_cm`. Preprocessing (`preprocessing.py`)
turns the frame into height above the table on one fixed grid, which is what survives the
clinics' differences in camera, table and sampling (`clinic_profiles.py`); a small CNN
(`model.py`) regresses both targets, standardised by fixed constants so sites agree without
sharing data; training frames are mirrored, swapped head-to-feet and shifted (`augmentation.py`).

Evaluation counts are additive integers (`metrics.py`): cases, fixed-point error sums and counts
within 10 % / 20 % of the truth, pooled exactly over sites into MAE, RMSE and P10/P20.
Literature anchors for the figures: depth camera MAE 6.2 kg / 4.9 cm, from CT images
3.9 kg / 3.7 cm, P10 of weight above 78 %, often about 90 %.

`phantom.py` draws the synthetic clinic fleet (`body.py`: a supine body whose volume matches its
weight; `scene.py`: the table, cushions, blanket and the camera) and writes clinic exports.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from domains.body_weight_height.augmentation import DEFAULT_AUGMENTATION, FrameAugmentation, augment_frames
from domains.body_weight_height.clinic_profiles import PROFILES, ClinicProfile, PatientMix
from domains.body_weight_height.metrics import (
    COUNT_KEYS, EVALUATION_BOUNDS, METRIC_KEYS, add_counts, error_counts, metrics_from_counts,
)
from domains.body_weight_height.mock_cases import mock_cases
from domains.body_weight_height.model import TARGETS, BodySizeNet, in_units, standardised
from domains.body_weight_height.phantom import PhantomFrame, generate_frame, phantom_fleet, write_phantom_site
from domains.body_weight_height.preprocessing import DEFAULT_GRID, FrameGrid, height_above_table, model_input
from domains.case_record import check_case_record
from domains.shuffled_batches import shuffled_batches

__all__ = [
    "DEFAULT_AUGMENTATION",
    "DEFAULT_GRID",
    "DOMAIN",
    "PROFILES",
    "TARGETS",
    "BodySizeNet",
    "BodyWeightHeight",
    "ClinicProfile",
    "FrameAugmentation",
    "FrameGrid",
    "PatientMix",
    "PhantomFrame",
    "add_counts",
    "check_body_case",
    "error_counts",
    "generate_frame",
    "height_above_table",
    "metrics_from_counts",
    "mock_cases",
    "model_input",
    "phantom_fleet",
    "write_phantom_site",
]


def check_body_case(case: dict[str, Any]) -> None:
    """A case this domain can train on or be evaluated with: the common schema plus both labels."""
    check_case_record(case)
    labels = case.get("labels") or {}
    missing = [name for name in TARGETS if name not in labels]
    if missing:
        raise ValueError(f"case {case['case_id']}: labels lack {missing}; a body_weight_height case needs labels "
                         f"{list(TARGETS)} (ingest depth frames with a labels file, or DICOM frames with "
                         "PatientWeight and PatientSize)")


class BodyWeightHeight:
    """CNN regression of (weight kg, height cm) from a depth frame's height map (`FrameGrid`),
    trained with MSE on standardised targets, with frame augmentation unless built without."""

    name = "body_weight_height"
    evaluation_scalars = COUNT_KEYS | METRIC_KEYS
    primary_metric = "mae_kg"
    higher_is_better = False
    evaluation_bounds = EVALUATION_BOUNDS  # what one patient adds to each count at most (noised evaluations)

    # Model inputs kept per frame (at most this many, ~24 KB each): every epoch and every evaluation
    # would otherwise find the table and resample the same frame again, most of a round's time.
    PREPARED_FRAMES = 2048

    def __init__(self, grid: FrameGrid = DEFAULT_GRID, augmentation: FrameAugmentation | None = DEFAULT_AUGMENTATION,
                 eval_batch_size: int = 64) -> None:
        self.grid, self.augmentation, self.eval_batch_size = grid, augmentation, eval_batch_size
        self._prepared: OrderedDict[tuple[str, bytes], np.ndarray] = OrderedDict()

    def prepared_input(self, case: dict[str, Any]) -> np.ndarray:
        """`model_input` of the case, computed once per frame content: keyed by the case id and a
        digest of its pixels and spacing, so a frame read again (another epoch, an evaluation, a
        fresh read of the case store) is not preprocessed again, and a different frame never shares
        an entry."""
        image = np.ascontiguousarray(case["image"])
        digest = hashlib.blake2b(image.tobytes(), digest_size=16)
        digest.update(np.asarray(case["spacing"], dtype=np.float64).tobytes())
        key = (str(case.get("case_id")), digest.digest())
        if key in self._prepared:
            self._prepared.move_to_end(key)
            return self._prepared[key]
        prepared = model_input(case, self.grid)
        self._prepared[key] = prepared
        if len(self._prepared) > self.PREPARED_FRAMES:
            self._prepared.popitem(last=False)
        return prepared

    def build_model(self) -> torch.nn.Module:
        return BodySizeNet()

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(prediction, target)

    def training_samples(self, cases: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """x float32 [N, 1, rows, cols] (each case's height map, one case read at a time) and
        y float32 [N, 2] (standardised weight, height): every frame once, what DP-SGD samples from."""
        if not len(cases):
            raise ValueError("no cases given; a site needs at least one labelled depth frame to train on")
        xs, ys = [], []
        for case in cases:
            check_body_case(case)
            xs.append(self.prepared_input(case))
            ys.append(standardised(case["labels"]))
        return np.stack(xs), np.stack(ys)

    def augmented(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of `training_samples` augmented frame by frame, as `batches` augments."""
        if self.augmentation is None:
            return x, y
        return augment_frames(x, rng, self.augmentation), y

    def batches(self, cases: Sequence[dict[str, Any]], batch_size: int, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch: every frame once in an order drawn from `rng`, x [B, 1, rows, cols], y [B, 2];
        the last batch may be smaller."""
        x, y = self.training_samples(cases)
        return (self.augmented(xb, yb, rng) for xb, yb in shuffled_batches(x, y, batch_size, rng))

    def without_augmentation(self) -> BodyWeightHeight:
        """The same domain training on the frames as they are."""
        return BodyWeightHeight(self.grid, augmentation=None, eval_batch_size=self.eval_batch_size)

    def predictions(self, model: torch.nn.Module, cases: Sequence[dict[str, Any]]) -> np.ndarray:
        """(weight kg, height cm) per case, float64 [N, 2]; cases are read in batches of `eval_batch_size`."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        outputs = []
        try:
            with torch.no_grad():
                for start in range(0, len(cases), self.eval_batch_size):
                    x = np.stack([self.prepared_input(cases[i]) for i in range(start, min(start + self.eval_batch_size, len(cases)))])
                    outputs.append(model(torch.from_numpy(x).to(device)).cpu().numpy())
        finally:
            model.train(was_training)
        return in_units(np.concatenate(outputs)) if outputs else np.zeros((0, 2))

    def predict(self, model: torch.nn.Module, case: dict[str, Any]) -> tuple[float, float]:
        """The model's (weight kg, height cm) for one frame (labels not needed)."""
        check_case_record(case)
        weight, height = self.predictions(model, [case])[0]
        return float(weight), float(height)

    def evaluation_counts(self, model: torch.nn.Module, cases: Sequence[dict[str, Any]]) -> dict[str, int]:
        for case in cases:
            check_body_case(case)
        true = np.array([[case["labels"][name] for name in TARGETS] for case in cases], dtype=np.float64).reshape(-1, 2)
        return error_counts(self.predictions(model, cases), true)

    def metrics_from_counts(self, counts: dict[str, int]) -> dict[str, float]:
        return metrics_from_counts(counts)

    def mock_cases(self, templates: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
        return mock_cases(templates, seed)


DOMAIN = BodyWeightHeight()

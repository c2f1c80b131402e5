"""The contract between a federated orchestrator and one learning task.

The orchestrator trains, aggregates and evaluates without knowing whether it handles 2D tumour
segmentation, a 3D U-Net or a regression: everything task-specific (model, loss, how case
records become tensors, what is counted at evaluation) sits behind this protocol.

Evaluation returns additive integer counts rather than metrics because a site's counts can be
summed with other sites' counts before the metric is computed, which makes the pooled metric
exact and lets a site release aggregates only. A domain whose metric is not a confusion matrix
(e.g. regression) returns other additive integer statistics (such as a count and fixed-point
sums) under its own keys and turns them into metrics in `metrics_from_counts`.

A domain may also estimate its model's starting point from the data (`OutputPrior`): a
segmentation model whose output bias starts far from the share of tumour voxels predicts no
tumour anywhere for its first rounds. The orchestrator then pools the sites' `foreground_counts`
(additive, like evaluation counts) before round 0 and builds the initial model with
`build_model(foreground_fraction=prior_from_counts(pooled))`. A domain without these methods
(e.g. the tumour-burden regression) is built with `build_model()` and never asked for them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch


@runtime_checkable
class Domain(Protocol):
    name: str
    evaluation_scalars: frozenset[str]  # every key `evaluation_counts` + `metrics_from_counts` return
    primary_metric: str  # the metric runs are compared on (e.g. "dice")
    higher_is_better: bool

    def build_model(self) -> torch.nn.Module:
        """A freshly initialised model; every site must be able to load its state_dict. A domain
        with an `OutputPrior` also takes `foreground_fraction` (None: its default prior), which
        changes initial values only, never names or shapes."""

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of a batch from `batches`."""

    def batches(self, cases: list[dict[str, Any]], batch_size: int, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of (x, y) tensors over `cases`, shuffled by `rng` so a round is reproducible."""

    def evaluation_counts(self, model: torch.nn.Module, cases: list[dict[str, Any]]) -> dict[str, int]:
        """Additive integer evaluation counts of `model` on `cases` (for segmentation: tp, fp, tn,
        fn over all voxels of all cases)."""

    def metrics_from_counts(self, counts: dict[str, int]) -> dict[str, float]:
        """Metrics from counts, possibly summed over several sites."""

    def mock_cases(self, templates: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
        """Synthetic case records with each template's shape, spacing, geometry and metadata keys and
        no real pixel or patient value: the mock asset a data scientist develops against. The site
        asks the domain of a dataset for them at ingestion."""


@runtime_checkable
class OutputPrior(Protocol):
    """Optional: a domain whose initial model starts from the data's share of foreground voxels."""

    def foreground_counts(self, cases: Sequence[dict[str, Any]]) -> dict[str, int]:
        """Additive integers over `cases` ("tumour_voxels", "voxels" for segmentation), summed
        over sites before `prior_from_counts`; the `foreground_share` site task returns them."""

    def prior_from_counts(self, counts: dict[str, int]) -> float:
        """The foreground share from (pooled) counts; the domain's default prior for empty counts."""

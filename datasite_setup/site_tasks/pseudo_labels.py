"""Teacher-student at the site: the received model labels the site's unlabelled cases.

Annotating 3-D scans costs experts hours per case; a site may hold many scans nobody has
contoured. In a `local_train` run over `train+unlabelled`, the weights the run received (the
federation's current model: the teacher) label every unlabelled case once, before any training
step (the domain's `pseudo_label`, which may leave voxels it is unsure of out of the loss, else its
`predict_mask`), and the student - the same model, trained on - learns from the expert masks and
those pseudo-labels together. The pseudo-labels exist only in this run's memory: they are never
written, never returned, and a new run starts from its own teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class PseudoLabelled(Sequence[dict[str, Any]]):
    """The run's cases, an unlabelled one carrying its pseudo-label as its "mask"; cases are still
    read one at a time from the site's (lazy) case source."""

    def __init__(self, cases: Sequence[dict[str, Any]], masks: dict[int, np.ndarray]) -> None:
        self.cases, self.masks = cases, masks

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        case = self.cases[index]
        return {**case, "mask": self.masks[index]} if index in self.masks else case


def pseudo_labelled(cases: Sequence[dict[str, Any]], labelled: Sequence[bool],
                    predict_mask: Callable[[dict[str, Any]], np.ndarray]) -> PseudoLabelled:
    """`cases` with every unlabelled one (`labelled[i]` False) masked by `predict_mask` (the teacher)."""
    masks = {index: np.asarray(predict_mask(cases[index]), dtype=np.uint8) for index, flag in enumerate(labelled) if not flag}
    return PseudoLabelled(cases, masks)

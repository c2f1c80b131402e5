"""Cases mapped onto a Nyul standard intensity scale before a task uses them (`harmonization`).

A task that takes `harmonization = {"nyul": StandardScale.to_params()}` (the scale the sites'
`intensity_landmarks` fitted, `analyses.harmonization.nyul`) sees every image mapped
piecewise-linearly from its own foreground percentiles onto the standard landmarks
(`datasite_setup.harmonization.nyul.standardize`), one case at a time: radiomics extracts features
from the mapped images, training and evaluation segment them. Masks and geometry are untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from datasite_setup.site_tasks.task import Param


def harmonization_problems(harmonization: dict[str, Any]) -> str | None:
    """Only {"nyul": StandardScale.to_params()} is known."""
    from datasite_setup.harmonization.nyul import StandardScale

    if set(harmonization) != {"nyul"}:
        return "must be {'nyul': <StandardScale.to_params()>}"
    try:
        scale = StandardScale.from_params(harmonization["nyul"])
    except (KeyError, TypeError, ValueError) as exc:
        return f"'nyul' is not a standard scale: {exc}"
    if any(b <= a for a, b in zip(scale.landmarks, scale.landmarks[1:])):
        return "'nyul' landmarks must be strictly increasing"
    return None


HARMONIZATION_PARAM = Param(dict, "{'nyul': standard scale} applied to each image first", required=False,
                            check=harmonization_problems)


def standardized(case: dict[str, Any], scale: Any) -> dict[str, Any]:
    """The case with its image on the standard scale (its own landmarks, computed as the sites did)."""
    from datasite_setup.harmonization.nyul import case_landmarks, standardize

    landmarks = case_landmarks(case["image"], None, scale.percentiles)
    return {**case, "image": standardize(case["image"], landmarks, scale).astype(np.float32)}


class HarmonizedCases(Sequence):
    """`cases` read one at a time, each standardized on the way out: nothing more held in memory."""

    def __init__(self, cases: Sequence[dict[str, Any]], scale: Any) -> None:
        self._cases, self._scale = cases, scale

    def __len__(self) -> int:
        return len(self._cases)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return standardized(self._cases[index], self._scale)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (standardized(case, self._scale) for case in self._cases)


def harmonized(cases: Sequence[dict[str, Any]], params: dict[str, Any]) -> Sequence[dict[str, Any]]:
    """`cases` as the request's `harmonization` maps them (as they are without one)."""
    from datasite_setup.harmonization.nyul import StandardScale

    if "harmonization" not in params:
        return cases
    return HarmonizedCases(cases, StandardScale.from_params(params["harmonization"]["nyul"]))

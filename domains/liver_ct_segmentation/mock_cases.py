"""Mock CT cases: what a data scientist develops against, built from a site's manifest entries.

Each mock has its template's shape, spacing, grid and metadata schema (patient values blanked) and
a drawn abdomen in plausible Hounsfield units: a body of soft tissue in air, a liver on the
patient's right with one hypodense lesion, labels 1 and 2 where they are drawn. No real voxel or
patient value enters; the picture only has to exercise the same code paths as a real case.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from domains.case_record import make_case_record, mock_case_id, mock_metadata, template_shape


def _ellipsoid(shape: tuple[int, int, int], centre: tuple[float, float, float], radii: tuple[float, float, float]) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / max(r, 0.5)) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def mock_ct_case(template: Mapping[str, Any], index: int, rng: np.random.Generator) -> dict[str, Any]:
    """One mock case shaped like `template` (a case record or a manifest entry)."""
    shape = template_shape(template)
    z, y, x = shape
    body = _ellipsoid(shape, (z / 2, y / 2, x / 2), (z * 2.0, y * 0.4, x * 0.45))
    liver = _ellipsoid(shape, (z * 0.5, y * 0.45, x * 0.33), (z * 0.35, y * 0.22, x * 0.2)) & body
    lesion = _ellipsoid(shape, (z * 0.5, y * 0.45, x * 0.3), (z * 0.08 + 1, y * 0.05 + 1, x * 0.05 + 1)) & liver
    image = np.full(shape, -1000.0, np.float32)
    image[body] = 40.0
    image[liver] = 110.0
    image[lesion] = 55.0
    image += rng.normal(0.0, 12.0, shape).astype(np.float32)
    mask = liver.astype(np.uint8)
    mask[lesion] = 2
    return make_case_record(
        mock_case_id(index), image, mask, template.get("spacing", (1.0, 1.0, 1.0)), template.get("origin", (0.0, 0.0, 0.0)),
        template.get("direction", (1, 0, 0, 0, 1, 0, 0, 0, 1)), mock_metadata(template.get("metadata") or {}),
    )


def mock_cases(templates: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [mock_ct_case(template, index, rng) for index, template in enumerate(templates)]

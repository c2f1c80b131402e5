"""Mock depth frames: what a data scientist develops against instead of a clinic's frames.

Each mock has its template's shape, spacing and metadata schema (patient-level values blanked)
and a synthetic frame: a patient drawn from a generic adult mix, lying on a generic table, seen
on the template's grid. Its labels (weight, height) are that synthetic patient's, never the
template's: no real pixel, label or patient value enters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from domains.body_weight_height.clinic_profiles import PROFILES, ClinicProfile
from domains.body_weight_height.phantom import generate_frame
from domains.case_record import make_case_record, mock_case_id, mock_metadata, template_shape

_GENERIC = PROFILES["clinic-a"]
_MIN_PIXELS = 8


def mock_profile(template: Mapping[str, Any]) -> ClinicProfile:
    """A generic clinic whose camera samples the template's grid, the table centred in its view."""
    _, rows, cols = template_shape(template)
    along, across = (float(v) for v in template.get("spacing", (1.0, 8.0, 8.0))[1:])
    view = (max(rows, _MIN_PIXELS) * along, max(cols, _MIN_PIXELS) * across)
    return replace(_GENERIC, name="mock", rows=max(rows, _MIN_PIXELS), cols=max(cols, _MIN_PIXELS), field_of_view_mm=view,
                   view_start_mm=(_GENERIC.table_length_mm - view[0]) / 2, view_lateral_mm=0.0)


def mock_frame(template: Mapping[str, Any], index: int, rng: np.random.Generator) -> dict[str, Any]:
    """One mock case shaped like `template` (a case record or a manifest entry)."""
    shape = template_shape(template)
    frame = generate_frame(mock_profile(template), rng)
    image = np.broadcast_to(frame.depth[: shape[1], : shape[2]].astype(np.float32), shape)
    return make_case_record(
        mock_case_id(index), image, None, template.get("spacing", (1.0, 8.0, 8.0)), template.get("origin", (0.0, 0.0, 0.0)),
        template.get("direction", (1, 0, 0, 0, 1, 0, 0, 0, 1)), mock_metadata(template.get("metadata") or {}),
        labels=frame.labels,
    )


def mock_cases(templates: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """One mock case per template, reproducible for a seed."""
    rng = np.random.default_rng(seed)
    return [mock_frame(template, index, rng) for index, template in enumerate(templates)]

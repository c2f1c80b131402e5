"""Mock paired cases: what a data scientist develops translation code against.

Each mock copies a private case's shape, spacing, geometry, metadata keys and further-image names
(a case record's `images` keys, or a manifest entry's `images` list), and renders a generic phantom
head in T1 (the image) and T2 (each further image), so no pixel of the site's data is in it. A
template without further images still gets one, `images["T2"]`, so the mock can be trained on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from domains.brain_mr_segmentation.phantom import GENERIC_PROFILE
from domains.case_record import make_case_record, mock_case_id, mock_metadata, template_shape
from domains.mr_translation.anatomy import draw_anatomy, smooth_field
from domains.mr_translation.contrasts import render_contrast, tissue_signal
from domains.mr_translation.phantom import TARGET_KEY

_SCANNER = GENERIC_PROFILE  # the segmentation phantom's scanner of no site


def further_image_names(template: dict[str, Any]) -> list[str]:
    """The names of a template's further images, sorted; `TARGET_KEY` when it has none."""
    return sorted(str(name) for name in (template.get("images") or ())) or [TARGET_KEY]


def mock_cases(templates: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """One synthetic paired case per template (a case record or a manifest entry), reproducible for a seed."""
    rng = np.random.default_rng(seed)
    mocks = []
    for index, template in enumerate(templates):
        shape = template_shape(template)
        anatomy = draw_anatomy(shape, tuple(float(s) for s in template["spacing"]), rng)
        bias_field = np.exp(_SCANNER.bias_field_strength * smooth_field(anatomy.coordinates, rng, 4, (250, 500)))
        image = render_contrast(anatomy, tissue_signal("T1", 1.0), bias_field, _SCANNER, rng)
        images = {name: render_contrast(anatomy, tissue_signal("T2", 1.0), bias_field, _SCANNER, rng)
                  for name in further_image_names(template)}
        mocks.append(make_case_record(
            mock_case_id(index), image, anatomy.mask, template["spacing"], template["origin"], template["direction"],
            mock_metadata(template.get("metadata") or {}), images=images,
        ))
    return mocks

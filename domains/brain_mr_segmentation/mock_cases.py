"""Mock cases for a brain-MR site: what a data scientist develops against instead of the private cases.

Each mock has a private case's shape, spacing, geometry and metadata keys, with synthetic pixels
(a phantom head and tumour rendered by `phantom.synthetic_case`) and patient-level metadata blanked.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from domains.brain_mr_segmentation.phantom import synthetic_case
from domains.case_record import make_case_record, mock_case_id, mock_metadata, template_shape


def mock_cases(templates: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """One synthetic case record per template (a case record or a manifest entry), reproducible for a seed."""
    rng = np.random.default_rng(seed)
    mocks = []
    for index, case in enumerate(templates):
        image, mask = synthetic_case(template_shape(case), tuple(case["spacing"]), rng)
        mocks.append(make_case_record(
            mock_case_id(index), image, mask, case["spacing"], case["origin"], case["direction"],
            mock_metadata(case["metadata"]),
        ))
    return mocks

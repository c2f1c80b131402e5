"""Covariates as ComBat's design columns, encoded identically at every site.

The pooled regression only makes sense if every site turns "sex = F" or "age = 63" into the same numbers,
so the levels of each categorical covariate are agreed centrally and sent to the sites. The encoding is
neuroCombat's: one indicator column per level except the first (the reference), categorical covariates
first in the order given, then continuous covariates as they are.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def _indicator_columns(name: str, values: Sequence[Any], levels: Sequence[Any]) -> np.ndarray:
    """[n, len(levels) - 1] indicators of every level but the reference levels[0]."""
    if len(levels) < 2 or len(set(levels)) != len(levels):
        raise ValueError(f"categorical covariate '{name}' needs at least 2 distinct levels, got {list(levels)}")
    unknown = sorted({str(v) for v in values if v not in levels})
    if unknown:
        raise ValueError(f"categorical covariate '{name}' has values {unknown} outside the agreed {list(levels)}")
    return np.array([[float(v == level) for level in levels[1:]] for v in values]).reshape(len(values), -1)


def encode_covariates(
    columns: Mapping[str, Sequence[Any]],
    continuous: Sequence[str] = (),
    categorical: Mapping[str, Sequence[Any]] | None = None,
) -> np.ndarray:
    """[n, q] design columns from per-case covariate values {name: [n values]}.

    categorical maps each categorical covariate to its agreed level list, reference level first.
    """
    categorical = categorical or {}
    names = [*categorical, *continuous]
    absent = [name for name in names if name not in columns]
    if absent:
        raise ValueError(f"covariate(s) {absent} not among the case columns {sorted(columns)}")
    lengths = {name: len(columns[name]) for name in names}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"covariate columns differ in length: {lengths}")
    n = next(iter(lengths.values()), 0)
    blocks = [_indicator_columns(name, list(columns[name]), list(levels)) for name, levels in categorical.items()]
    for name in continuous:
        values = np.asarray(columns[name], dtype=float)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"continuous covariate '{name}' has missing or non-finite values")
        blocks.append(values.reshape(-1, 1))
    return np.hstack(blocks) if blocks else np.zeros((n, 0))

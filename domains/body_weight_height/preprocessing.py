"""From a clinic's depth frame to what the model sees: height above the table on one fixed grid.

Distances in a frame mean little on their own: the same patient reads 300 mm nearer under a low
ceiling, the table's height and cradle differ between clinics, a gantry camera adds a slope along
the table, and frames are sampled at 7-25 mm per pixel. The shape of the body above the table is
what carries weight (its volume) and height (its length), so preprocessing keeps only that:

1. The table is found in the frame itself, so no clinic needs to calibrate its camera: readings
   more than `FLOOR_GAP_MM` behind the nearest surface are the floor; per row, the farthest
   non-floor readings are the table, and a line fitted along the rows (rows whose estimate lies
   nearer than the line, where the body hides the cradle's middle, are dropped) gives the table's
   distance and slope. What stays of the cradle's curve is each column's lowest height over the
   table, subtracted too.
2. Missing readings (0) are filled from their neighbours (normalised Gaussian smoothing), so holes
   do not read as the table.
3. The heights are resampled (linear, with smoothing against aliasing) onto `FrameGrid`: a fixed
   pixel size in mm, centred on the body, so a body's length in pixels means the same length at
   every clinic, and divided by a fixed height scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

FLOOR_GAP_MM = 600.0  # no lying patient is thicker than this; no CT table is lower than this above the floor
MIN_READINGS_SHARE = 0.2  # fewer readings than this and the table cannot be told from the body
BODY_MM = 20.0  # heights above the table that count as body when centring
_TABLE_PERCENTILE = 95.0
_CRADLE_PERCENTILE = 10.0
_LINE_TOLERANCE_MM = 12.0
_FILL_SIGMA_PX = 1.5


@dataclass(frozen=True)
class FrameGrid:
    """The model's input grid: `rows` x `cols` pixels of `pixel_mm`, rows along the table, heights
    divided by `height_scale_mm`. The default covers 2.3 m x 0.86 m: a 2 m patient with raised
    arms, and a wide one."""

    pixel_mm: float = 18.0
    rows: int = 128
    cols: int = 48
    height_scale_mm: float = 250.0

    def __post_init__(self) -> None:
        if self.pixel_mm <= 0 or self.rows < 16 or self.cols < 16 or self.height_scale_mm <= 0:
            raise ValueError(f"FrameGrid needs pixel_mm > 0, rows and cols >= 16, height_scale_mm > 0; got {self}")


DEFAULT_GRID = FrameGrid()


def height_above_table(depth: np.ndarray, case_id: str = "frame") -> np.ndarray:
    """Height in mm of the surface above the table, [rows, cols] like `depth` (mm from the
    camera, 0 = no reading); 0 on the table, the floor and where nothing was read near a body."""
    depth = np.asarray(depth, dtype=np.float64)
    valid = depth > 0
    if valid.sum() < MIN_READINGS_SHARE * depth.size:
        raise ValueError(f"case {case_id}: only {valid.mean():.0%} of the depth frame holds readings (0 = no reading); "
                         f"a frame needs at least {MIN_READINGS_SHARE:.0%} to find the table")
    nearest = np.percentile(depth[valid], 0.5)
    near = valid & (depth < nearest + FLOOR_GAP_MM)
    table = _table_distance(np.where(near, depth, np.nan))
    heights = np.where(near, table[:, None] - depth, np.nan)
    cradle = _column_floor(heights)
    heights = np.where(near, heights - cradle[None, :], 0.0)
    heights = np.where(valid, heights, _filled(np.where(valid, heights, 0.0), valid))
    return np.clip(heights, 0.0, FLOOR_GAP_MM)


def model_input(case: dict[str, Any], grid: FrameGrid = DEFAULT_GRID) -> np.ndarray:
    """The case's frame as float32 [1, rows, cols] on `grid`, centred on the body."""
    image = np.asarray(case["image"])
    if image.ndim != 3 or image.shape[0] != 1:
        raise ValueError(f"case {case.get('case_id')}: a depth frame's image is [1, rows, cols], got {list(image.shape)}")
    heights = height_above_table(image[0], str(case.get("case_id")))
    along, across = (float(v) for v in case["spacing"][1:])
    if along <= 0 or across <= 0:
        raise ValueError(f"case {case.get('case_id')}: spacing {case['spacing']} must be positive mm")
    rows, cols = np.nonzero(heights > BODY_MM)
    centre = (rows.mean(), cols.mean()) if len(rows) else ((heights.shape[0] - 1) / 2, (heights.shape[1] - 1) / 2)
    sigma = [np.sqrt(max((grid.pixel_mm / s) ** 2 - 1.0, 0.0)) / 2 for s in (along, across)]
    smoothed = gaussian_filter(heights, sigma) if max(sigma) > 0 else heights
    offsets_r = (np.arange(grid.rows) - (grid.rows - 1) / 2) * grid.pixel_mm / along
    offsets_c = (np.arange(grid.cols) - (grid.cols - 1) / 2) * grid.pixel_mm / across
    coords = np.meshgrid(centre[0] + offsets_r, centre[1] + offsets_c, indexing="ij")
    resampled = map_coordinates(smoothed, coords, order=1, mode="constant", cval=0.0)
    return (resampled / grid.height_scale_mm)[None].astype(np.float32)


def _table_distance(near: np.ndarray) -> np.ndarray:
    """Distance to the table per row: a line through the rows' farthest non-floor readings."""
    counts = np.sum(np.isfinite(near), axis=1)
    rows = np.flatnonzero(counts >= 3)
    if len(rows) < 2:
        return np.full(near.shape[0], np.nanmax(near))
    per_row = np.nanpercentile(near[rows], _TABLE_PERCENTILE, axis=1)
    keep = np.ones(len(rows), dtype=bool)
    for _ in range(3):
        slope, intercept = np.polyfit(rows[keep], per_row[keep], 1)
        fitted = slope * rows + intercept
        keep = per_row >= fitted - _LINE_TOLERANCE_MM
        if keep.sum() < 2:
            break
    return slope * np.arange(near.shape[0]) + intercept


def _column_floor(heights: np.ndarray) -> np.ndarray:
    """Per column, the lowest heights above the table line (the cradle's curve); 0 for columns
    without readings."""
    counts = np.sum(np.isfinite(heights), axis=0)
    floor = np.zeros(heights.shape[1])
    columns = np.flatnonzero(counts >= 3)
    if len(columns):
        floor[columns] = np.nanpercentile(heights[:, columns], _CRADLE_PERCENTILE, axis=0)
    return floor


def _filled(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Each pixel's Gaussian-weighted mean of the valid pixels around it (0 far from any)."""
    weight = gaussian_filter(valid.astype(np.float64), _FILL_SIGMA_PX)
    total = gaussian_filter(values, _FILL_SIGMA_PX)
    return np.where(weight > 0.05, total / np.maximum(weight, 1e-9), 0.0)

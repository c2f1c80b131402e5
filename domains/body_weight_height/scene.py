"""What a clinic's depth camera sees: a patient on the CT table, as a distance image in mm.

The scene is built in table coordinates (x along the table from its head end, y across it from
its middle, z up from the floor): the floor, the table's cradle (higher at its edges than in the
middle), the clinic's supports (a head rest, a cushion under the knees), the patient's body
(`body.BodyShape`) placed with an offset and a small rotation, head or feet first, and a blanket
lying over the legs and part of the trunk (the body's surface smoothed and raised: it bridges the
gap between the legs, adding volume the camera cannot tell from the patient's). The camera then
reads the distance to that surface per pixel, tilted if it hangs on the gantry, with noise that
grows with distance, readings lost beyond its range, at random and on steep edges (0 = no
reading), rounded to whole mm as a 16-bit frame stores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, maximum_filter

from domains.body_weight_height.body import BodyShape
from domains.body_weight_height.clinic_profiles import ClinicProfile

NOISE_REFERENCE_MM = 1500.0
EDGE_STEP_MM = 40.0  # a depth step between neighbouring pixels above which the sensor may see no return


@dataclass(frozen=True)
class Placement:
    """Where and how the patient lies on the table and what covers them. `head_mm` is the table
    position (from the end the patient's head points to) of the top of the head; `blanket_from`
    the share of the body's length where a blanket starts (None: no blanket)."""

    head_mm: float
    lateral_mm: float = 0.0
    yaw_deg: float = 0.0
    feet_first: bool = False
    knee_cushion: bool = False
    blanket_from: float | None = None
    blanket_mm: float = 15.0


def pixel_centres(profile: ClinicProfile) -> tuple[np.ndarray, np.ndarray]:
    """Table coordinates (x along, y across; mm) of every pixel centre, each [rows, cols]."""
    along, across = profile.pixel_spacing_mm
    x = profile.view_start_mm + (np.arange(profile.rows) + 0.5) * along
    y = profile.view_lateral_mm + (np.arange(profile.cols) + 0.5 - profile.cols / 2) * across
    return np.meshgrid(x, y, indexing="ij")


def body_coordinates(x: np.ndarray, y: np.ndarray, placement: Placement, table_length_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(s, v) body coordinates of table points: s from the top of the head towards the heels."""
    head = table_length_mm - placement.head_mm if placement.feet_first else placement.head_mm
    angle = np.deg2rad(placement.yaw_deg)
    dx, dy = x - head, y - placement.lateral_mm
    s = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    return (-s, v) if placement.feet_first else (s, v)


def render_depth(profile: ClinicProfile, body: BodyShape, placement: Placement, rng: np.random.Generator) -> np.ndarray:
    """The camera's frame: uint16 [rows, cols], distance to the surface in mm, 0 = no reading."""
    surface = scene_heights(profile, body, placement)
    x, _ = pixel_centres(profile)
    tilt = np.deg2rad(profile.camera_tilt_deg)
    depth = (profile.camera_height_mm - surface) * np.cos(tilt) + (x - profile.table_length_mm / 2) * np.sin(tilt)
    depth = depth + rng.normal(0.0, 1.0, depth.shape) * profile.noise_mm * (depth / NOISE_REFERENCE_MM) ** 2
    missing = (depth > profile.max_range_mm) | (rng.random(depth.shape) < profile.dropout)
    rows_step, cols_step = np.gradient(depth)
    steep = np.maximum(np.abs(rows_step), np.abs(cols_step)) > EDGE_STEP_MM
    missing |= steep & (rng.random(depth.shape) < profile.edge_dropout)
    return np.where(missing, 0, np.clip(np.rint(depth), 1, 65535)).astype(np.uint16)


def scene_heights(profile: ClinicProfile, body: BodyShape, placement: Placement) -> np.ndarray:
    """Height above the floor (mm) of the highest surface under every pixel, before the camera."""
    x, y = pixel_centres(profile)
    half_width = profile.table_width_mm / 2
    on_table = (x >= 0) & (x <= profile.table_length_mm) & (np.abs(y) <= half_width)
    cradle = profile.table_height_mm + profile.table_curve_mm * (np.clip(y, -half_width, half_width) / half_width) ** 2
    s, v = body_coordinates(x, y, placement, profile.table_length_mm)
    height = body.height_mm
    supports = profile.headrest_mm * _bump(s, -0.02 * height, 0.14 * height) * (np.abs(v) < 130.0)
    if placement.knee_cushion:
        supports = supports + profile.knee_cushion_mm * _bump(s, 0.64 * height, 0.80 * height)
    lying_on = cradle + np.where(on_table, supports, 0.0)
    body_height = body.surface(s, v)
    surface = np.where(body_height > 0, lying_on + body_height, np.where(on_table, lying_on, 0.0))
    if placement.blanket_from is not None:
        surface = _with_blanket(surface, s, v, on_table, placement, body, profile)
    return surface


def _bump(s: np.ndarray, start: float, stop: float) -> np.ndarray:
    """1 in the middle of [start, stop], falling smoothly (raised cosine) to 0 at its ends."""
    inside = (s > start) & (s < stop)
    phase = (s - start) / (stop - start)
    return np.where(inside, 0.5 - 0.5 * np.cos(2 * np.pi * phase), 0.0) ** 0.5


def _with_blanket(surface: np.ndarray, s: np.ndarray, v: np.ndarray, on_table: np.ndarray, placement: Placement,
                  body: BodyShape, profile: ClinicProfile) -> np.ndarray:
    along, across = profile.pixel_spacing_mm
    size = (max(1, round(60.0 / along)), max(1, round(60.0 / across)))
    draped = gaussian_filter(maximum_filter(surface, size=size), sigma=(40.0 / along, 40.0 / across))
    covered = (s >= placement.blanket_from * body.height_mm) & (s <= body.height_mm * 1.06) & (np.abs(v) < 320.0)
    covered &= on_table
    return np.where(covered, np.maximum(surface, draped + placement.blanket_mm), surface)

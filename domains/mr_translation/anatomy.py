"""One synthetic head as tissue labels: what both contrasts of a paired phantom are rendered from.

Translation needs the *same* anatomy seen twice (T1 and T2), so the phantom draws tissues first and
intensities later (`contrasts`), unlike the segmentation phantom, which draws one FLAIR-like image
directly. The geometry follows that phantom (head ellipsoid with scalp, skull, CSF, grey and white
matter, two ventricles, maybe a tumour with oedema) and is drawn in patient millimetres, so a seed
gives a comparable head at any resolution.

Arrays are [Z, Y, X]; coordinates follow DICOM (LPS), slice k at z = origin_z + k * spacing_z.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

TISSUES = ("air", "scalp", "skull", "csf", "grey", "white", "oedema", "tumour")
LABEL = {name: value for value, name in enumerate(TISSUES)}

_HEAD_SEMI_AXES_MM = (72.0, 90.0, 80.0)  # x (left-right), y (anterior-posterior), z
# Shell boundaries in normalised head radius (1 = skin surface).
_SKULL_OUTER, _CSF_OUTER, _BRAIN_OUTER, _GREY_INNER = 0.93, 0.86, 0.82, 0.68

Coordinates = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Anatomy:
    """Tissue labels (indices into `TISSUES`), a smooth texture (~1 +- 0.05) that modulates every
    contrast alike, the tumour mask, and the grid: `spacing` (z, y, x) mm, `origin` (x, y, z) mm."""

    labels: np.ndarray
    texture: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    coordinates: Coordinates


def grid_coordinates(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[Coordinates, tuple[float, float, float]]:
    """Patient coordinates (z, y, x broadcastable mm) of a grid centred on the origin, and its first voxel's (x, y, z)."""
    n_z, n_y, n_x = shape
    s_z, s_y, s_x = spacing
    origin = (-(n_x - 1) / 2 * s_x, -(n_y - 1) / 2 * s_y, -(n_z - 1) / 2 * s_z)
    coordinates = (
        (origin[2] + np.arange(n_z) * s_z).astype(np.float32)[:, None, None],
        (origin[1] + np.arange(n_y) * s_y).astype(np.float32)[None, :, None],
        (origin[0] + np.arange(n_x) * s_x).astype(np.float32)[None, None, :],
    )
    return coordinates, origin


def smooth_field(coordinates: Coordinates, rng: np.random.Generator, n_modes: int, wavelength_mm: tuple[float, float]) -> np.ndarray:
    """A random smooth field in [-1, 1] made of plane waves in millimetres: independent of the
    sampling grid (unlike blurred voxel noise) and bounded without looking at it."""
    z, y, x = coordinates
    directions = rng.normal(size=(n_modes, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavenumbers = 2 * np.pi / rng.uniform(*wavelength_mm, size=n_modes)
    phases = rng.uniform(0, 2 * np.pi, size=n_modes)
    amplitudes = rng.uniform(0.5, 1.0, size=n_modes)
    amplitudes /= amplitudes.sum()
    total = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=np.float32)
    for (dx, dy, dz), k, phase, amplitude in zip(directions, wavenumbers, phases, amplitudes):
        total += np.float32(amplitude) * np.cos(np.float32(k) * (np.float32(dx) * x + np.float32(dy) * y + np.float32(dz) * z) + np.float32(phase))
    return total


def _ellipsoid_radius(coordinates: Coordinates, centre: np.ndarray, semi_axes: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface); `centre`, `semi_axes` (x, y, z) mm."""
    z, y, x = coordinates
    offsets = (x - centre[0], y - centre[1], z - centre[2])
    local = [sum(rotation[row, axis] * offsets[row] for row in range(3)) for axis in range(3)]
    return np.sqrt(sum((local[axis] / semi_axes[axis]) ** 2 for axis in range(3)))


def draw_anatomy(shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator,
                 tumour_prevalence: float = 0.5, tumour_radius_mm: tuple[float, float] = (12.0, 24.0)) -> Anatomy:
    """A head on the grid, with a tumour (and unlabelled oedema around it) with probability
    `tumour_prevalence`; the tumour centre lies in the deep brain, pulled into the imaged slab."""
    n_z, n_y, n_x = shape
    s_z, s_y, s_x = spacing
    coordinates, origin = grid_coordinates(shape, spacing)
    fov_half = np.array([n_x * s_x / 2, n_y * s_y / 2, np.inf])
    semi_axes = np.minimum(np.array(_HEAD_SEMI_AXES_MM) * rng.uniform(0.93, 1.07, size=3), 0.92 * fov_half)
    head_centre = rng.uniform([-4, -4, -6], [4, 4, 6])
    head_rotation = Rotation.from_euler("z", rng.uniform(-8, 8), degrees=True).as_matrix()
    head_r = _ellipsoid_radius(coordinates, head_centre, semi_axes, head_rotation)
    head_r = head_r * (1 + 0.04 * smooth_field(coordinates, rng, 6, (80, 200)))
    grey_inner = _GREY_INNER + 0.06 * smooth_field(coordinates, rng, 10, (18, 40))
    texture = 1 + 0.03 * smooth_field(coordinates, rng, 10, (8, 20))

    labels = np.full(shape, LABEL["air"], dtype=np.uint8)
    labels[head_r <= 1.0] = LABEL["scalp"]
    labels[head_r <= _SKULL_OUTER] = LABEL["skull"]
    labels[head_r <= _CSF_OUTER] = LABEL["csf"]
    brain = head_r <= _BRAIN_OUTER
    labels[brain] = LABEL["grey"]
    labels[brain & (head_r <= grey_inner)] = LABEL["white"]
    for side in (-1, 1):
        ventricle = _ellipsoid_radius(coordinates, head_centre + head_rotation @ [side * 11, 0, 4], np.array([6.0, 22.0, 12.0]), head_rotation)
        labels[ventricle <= 1] = LABEL["csf"]

    mask = np.zeros(shape, dtype=np.uint8)
    if rng.random() < tumour_prevalence:
        radius = rng.uniform(*tumour_radius_mm)
        direction = rng.normal(size=3)
        centre = head_centre + 0.55 * semi_axes * rng.uniform() ** (1 / 3) * direction / np.linalg.norm(direction)
        z_limit = max(0.0, (n_z - 1) / 2 * s_z - 0.5 * radius)
        centre[2] = np.clip(centre[2], -z_limit, z_limit)
        tumour_axes = radius * rng.uniform(0.75, 1.25, size=3)
        tumour_rotation = Rotation.from_euler("zyx", rng.uniform(-180, 180, size=3), degrees=True).as_matrix()
        tumour_r = _ellipsoid_radius(coordinates, centre, tumour_axes, tumour_rotation)
        tumour_r = tumour_r * (1 + 0.12 * smooth_field(coordinates, rng, 6, (15, 40)))
        labels[brain & (tumour_r <= 1.4)] = LABEL["oedema"]
        tumour = brain & (tumour_r <= 1.0)
        labels[tumour] = LABEL["tumour"]
        mask[tumour] = 1
    return Anatomy(labels=labels, texture=texture.astype(np.float32), mask=mask,
                   spacing=(float(s_z), float(s_y), float(s_x)), origin=tuple(float(v) for v in origin),
                   coordinates=coordinates)

"""A parametric adult lying supine: the surface a depth camera sees, shaped by weight, height and sex.

Why a body whose volume is fitted to its weight: a camera sees the front surface of a patient
lying on the table, and what relates that surface to weight is the volume under it (weight =
density x volume). If the phantom's widths were simply drawn from BMI, a model could learn some
proxy of the drawing rule instead of the volume. Here the shape follows anthropometric proportions
(segment lengths as shares of height, widths and depths growing with BMI, the abdomen most, wider
shoulders for men and hips for women), and then all widths and depths are scaled together until
the volume under the surface equals weight / density, plus the share hidden from the camera
(gaps under the neck, the lower back and the knees, which it counts as body). Density and that
share vary between patients, which leaves an irreducible error of a few percent, as real bodies do.

Height is the distance from the top of the head to the heels; arms raised over the head reach
beyond it and feet pointing up stand above the table at the far end, so the body's extent on the
table is not its height.

Coordinates: `s` runs along the body from the top of the head (0) to the heels (height in mm),
`v` across it (mm, 0 on the midline). `BodyShape.surface(s, v)` is the height in mm of the
body's surface above what it lies on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REFERENCE_BMI = 22.0
REFERENCE_HEIGHT_MM = 1720.0
_FIT_GRID_MM = 15.0
_FIT_ROUNDS = 3

# Trunk cross-sections along the body (share of height from the head's top): half-width and
# depth in mm of a reference man (172 cm, BMI 22), and how strongly each grows with BMI.
_TRUNK_S = np.array([0.120, 0.160, 0.180, 0.280, 0.400, 0.500, 0.540])
_TRUNK_HALF_WIDTH = {"M": np.array([50.0, 120.0, 185.0, 165.0, 140.0, 170.0, 150.0]),
                     "F": np.array([45.0, 110.0, 165.0, 150.0, 135.0, 185.0, 165.0])}
_TRUNK_DEPTH = np.array([110.0, 120.0, 150.0, 210.0, 190.0, 195.0, 160.0])
_TRUNK_WIDTH_BMI_POWER = np.array([0.2, 0.4, 0.4, 0.5, 0.7, 0.6, 0.6])
_TRUNK_DEPTH_BMI_POWER = np.array([0.3, 0.5, 0.5, 0.6, 1.0, 0.8, 0.7])


@dataclass(frozen=True)
class Patient:
    """Who lies on the table. `density_kg_per_l` is whole-body density (lungs included);
    `hidden_share` the volume the camera counts as body although it is air under the body."""

    weight_kg: float
    height_cm: float
    sex: str = "M"
    density_kg_per_l: float = 1.01
    hidden_share: float = 0.05

    def __post_init__(self) -> None:
        if self.sex not in ("M", "F"):
            raise ValueError(f"Patient.sex must be 'M' or 'F', got {self.sex!r}")
        if not 100.0 <= self.height_cm <= 230.0:
            raise ValueError(f"Patient.height_cm must be 100-230 for an adult body, got {self.height_cm}")
        if not 10.0 <= self.bmi <= 70.0:
            raise ValueError(f"Patient BMI {self.bmi:.1f} (weight {self.weight_kg} kg, height {self.height_cm} cm) "
                             "is outside 10-70")

    @property
    def bmi(self) -> float:
        return self.weight_kg / (self.height_cm / 100.0) ** 2


@dataclass(frozen=True)
class Pose:
    """How the patient lies: arms at the sides or raised over the head, the ankles' distance from
    the midline (mm)."""

    arms_up: bool = False
    ankle_spread_mm: float = 110.0


@dataclass(frozen=True)
class Segment:
    """A limb piece from (s0, v0) to (s1, v1), half-width and depth varying linearly along it:
    each point at distance d from the piece stands depth * sqrt(1 - (d / half-width)²) high."""

    s0: float
    v0: float
    s1: float
    v1: float
    half_width: tuple[float, float]
    depth: tuple[float, float]


class BodyShape:
    """A patient's surface: a trunk (cross-sections along the midline) and limb segments."""

    def __init__(self, patient: Patient, pose: Pose, scale: float = 1.0) -> None:
        self.patient, self.pose, self.scale = patient, pose, scale
        height = patient.height_cm * 10.0
        ratio = patient.bmi / REFERENCE_BMI
        frame = np.sqrt(height / REFERENCE_HEIGHT_MM)  # taller people are also somewhat broader
        self.height_mm = height
        self.trunk_s = _TRUNK_S * height
        self.trunk_half_width = _TRUNK_HALF_WIDTH[patient.sex] * ratio**_TRUNK_WIDTH_BMI_POWER * frame * scale
        self.trunk_depth = _TRUNK_DEPTH * ratio**_TRUNK_DEPTH_BMI_POWER * frame * scale
        self.segments = self._head() + self._legs(ratio, frame) + self._arms(ratio, frame)

    def _head(self) -> list[Segment]:
        h, k = self.height_mm, self.scale**0.3  # heads vary little with weight
        half_width, depth = 75.0 * k, 195.0 * k
        return [Segment(half_width * 0.9, 0.0, 0.125 * h - half_width * 0.8, 0.0, (half_width, half_width * 0.85),
                        (depth, depth * 0.9))]

    def _legs(self, ratio: float, frame: float) -> list[Segment]:
        h, k = self.height_mm, self.scale * frame
        thigh, knee, ankle = 95.0 * ratio**0.55 * k, 55.0 * ratio**0.4 * k, 36.0 * ratio**0.2 * k
        thigh_depth, knee_depth, ankle_depth = 160.0 * ratio**0.7 * k, 110.0 * ratio**0.5 * k, 75.0 * ratio**0.3 * k
        spread = self.pose.ankle_spread_mm
        segments = []
        for side in (-1.0, 1.0):
            hip_v, knee_v, ankle_v = side * thigh * 0.95, side * (thigh * 0.7 + spread * 0.4), side * spread
            segments += [
                Segment(0.50 * h, hip_v, 0.715 * h, knee_v, (thigh, knee), (thigh_depth, knee_depth)),
                Segment(0.715 * h, knee_v, 0.955 * h, ankle_v, (knee, ankle), (knee_depth, ankle_depth)),
                # The foot of a supine patient points up: heel on the table, toes ~0.12 H above it.
                Segment(0.955 * h, ankle_v, 0.985 * h, ankle_v * 1.1, (ankle * 1.2, 40.0 * k), (0.12 * h, 0.12 * h)),
            ]
        return segments

    def _arms(self, ratio: float, frame: float) -> list[Segment]:
        h, k = self.height_mm, self.scale * frame
        upper, fore, hand = 45.0 * ratio**0.5 * k, 37.0 * ratio**0.4 * k, 42.0 * k
        upper_depth, fore_depth, hand_depth = 85.0 * ratio**0.6 * k, 70.0 * ratio**0.5 * k, 35.0 * k
        shoulder_s = 0.19 * h
        shoulder_v = float(np.interp(shoulder_s, self.trunk_s, self.trunk_half_width)) - upper * 0.6
        segments = []
        for side in (-1.0, 1.0):
            if self.pose.arms_up:  # raised beside and beyond the head, resting on the table
                elbow = (shoulder_s - 0.17 * h, side * (shoulder_v * 0.9 + 20.0))
                wrist = (elbow[0] - 0.14 * h, side * 120.0)
                finger = (wrist[0] - 0.10 * h, side * 95.0)
            else:  # at the sides, just outside the trunk
                elbow_s, wrist_s = shoulder_s + 0.186 * h, shoulder_s + 0.332 * h
                elbow = (elbow_s, side * (self._trunk_half_width_at(elbow_s) + upper + 10.0))
                wrist = (wrist_s, side * (self._trunk_half_width_at(wrist_s) + fore + 15.0))
                finger = (wrist_s + 0.10 * h, wrist[1] * 1.02)
            segments += [
                Segment(shoulder_s, side * shoulder_v, *elbow, (upper, fore * 1.1), (upper_depth, fore_depth * 1.1)),
                Segment(*elbow, *wrist, (fore * 1.1, fore), (fore_depth * 1.1, fore_depth)),
                Segment(*wrist, *finger, (hand, hand * 0.8), (hand_depth, hand_depth * 0.6)),
            ]
        return segments

    def _trunk_half_width_at(self, s: float) -> float:
        """The trunk's half-width at `s`, and below the trunk the hips' (legs take over there)."""
        return float(np.interp(min(s, self.trunk_s[-1]), self.trunk_s, self.trunk_half_width))

    def surface(self, s: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Height in mm of the body's surface above its support at body coordinates (s, v)."""
        s, v = np.asarray(s, dtype=np.float64), np.asarray(v, dtype=np.float64)
        inside = (s >= self.trunk_s[0]) & (s <= self.trunk_s[-1])
        half_width = np.interp(s, self.trunk_s, self.trunk_half_width)
        depth = np.interp(s, self.trunk_s, self.trunk_depth)
        heights = np.where(inside, depth * _dome(np.abs(v) / half_width), 0.0)
        for segment in self.segments:
            np.maximum(heights, _segment_surface(segment, s, v), out=heights)
        return heights

    def volume_l(self) -> float:
        """Volume in litres under the surface, on a 15 mm grid over the whole body (within 0.3 % of a 5 mm grid)."""
        h = self.height_mm
        s = np.arange(-0.5 * h, 1.05 * h, _FIT_GRID_MM)
        v = np.arange(-500.0, 500.0, _FIT_GRID_MM)
        return float(self.surface(s[:, None], v[None, :]).sum()) * _FIT_GRID_MM**2 / 1e6


def fit_body(patient: Patient, pose: Pose) -> BodyShape:
    """The patient's body scaled in width and depth until the volume the camera counts as body
    equals weight / density x (1 + hidden share)."""
    target = patient.weight_kg / patient.density_kg_per_l * (1.0 + patient.hidden_share)
    shape = BodyShape(patient, pose)
    for _ in range(_FIT_ROUNDS):  # volume grows ~ with the square of the scale
        shape = BodyShape(patient, pose, shape.scale * np.sqrt(target / shape.volume_l()))
    return shape


def _dome(x: np.ndarray) -> np.ndarray:
    """Cross-section of a lying body part, x = distance from its middle over its half-width: an
    ellipse flattened a little at the top (exponent 2.5), 0 beyond the edge."""
    return np.power(np.clip(1.0 - np.abs(x) ** 2.5, 0.0, None), 1.0 / 2.5)


def _segment_surface(segment: Segment, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    ds, dv = segment.s1 - segment.s0, segment.v1 - segment.v0
    length2 = ds * ds + dv * dv
    t = np.clip(((s - segment.s0) * ds + (v - segment.v0) * dv) / length2, 0.0, 1.0)
    distance = np.hypot(s - (segment.s0 + t * ds), v - (segment.v0 + t * dv))
    half_width = segment.half_width[0] + t * (segment.half_width[1] - segment.half_width[0])
    depth = segment.depth[0] + t * (segment.depth[1] - segment.depth[0])
    return depth * _dome(distance / half_width)

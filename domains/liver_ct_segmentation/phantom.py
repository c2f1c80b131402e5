"""Synthetic abdominal CT phantoms: a fleet of hospitals' liver CT cases, drawn in memory.

Real patient CT cannot leave a hospital, yet tests, demos and simulations of a liver segmentation
federation need sites whose cases look and differ like the real thing: HU images with a liver, its
lesions and the organs around it, from scanners that differ in kernel, dose, slice thickness, pixel
size and contrast phase (`scanner_profiles`). `phantom_dicom` files these cases as a hospital's
DICOM export.

Anatomy is drawn in patient millimetres, not voxels, as an ordered list of painted shapes, so the
same seed gives the same patient at any matrix size, and a point's tissue can be asked without a
grid (which is how the liver is scaled to its drawn volume and lesions are placed inside it).
The scanner then acts as CT does: each slice averages the anatomy over its thickness (partial
volume), the kernel blurs in-plane, noise with the kernel's texture is added at the dose's level,
and values are rounded to the integers the scanner stores.

Labels: 0 background, 1 liver, 2 lesion. A voxel is liver (1) when at least half of its slab is
liver tissue, intrahepatic vessels and lesions included (the organ envelope, as liver datasets
label it; the IVC, gallbladder and kidneys that indent the liver are not liver), and lesion (2)
when at least half of it is lesion; lesions lie inside the liver, so every lesion voxel is also
inside the envelope.

Coordinates follow DICOM/ITK (LPS): +x towards the patient's left, +y posterior, +z superior; the
patient lies supine, head first. Arrays are [Z, Y, X]; slice k lies at z = origin_z + k * spacing_z.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import scipy.fft
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from domains.case_record import make_case_record
from domains.liver_ct_segmentation.scanner_profiles import NON_CONTRAST, PROFILES, CTScannerProfile

IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
BACKGROUND, LIVER, LESION = 0, 1, 2
DEFAULT_FLEET = ("hospital-a", "hospital-b", "hospital-c")
LESION_COUNT_PROBABILITIES = (0.2, 0.4, 0.25, 0.15)  # 0, 1, 2, 3 lesions: one case in five is lesion-free
LESION_RADIUS_MM = (5.0, 25.0)
LIVER_VOLUME_ML = (1300.0, 1900.0)  # drawn per patient; the labelled volume lands within ~1.2-2.2 L
_LIVER_SCALE_LIMITS = (0.8, 1.25)  # of the lobes' template sizes, to reach the drawn volume

_MAX_SUBSLICE_MM = 1.25  # anatomy is sampled at least this finely along z before slices average it


class Tissue(IntEnum):
    """What fills a point of the phantom; each tissue has one HU per patient (see `_tissue_hu`)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    LUNG = 3
    HEART = 4
    CANCELLOUS_BONE = 5
    CORTICAL_BONE = 6
    DISC = 7
    CSF = 8
    AORTA = 9
    IVC = 10
    KIDNEY_CORTEX = 11
    KIDNEY_MEDULLA = 12
    SPLEEN = 13
    BOWEL_WALL = 14
    GAS = 15
    FLUID = 16
    GALLBLADDER = 17
    LIVER = 18
    PORTAL_VEIN = 19
    HEPATIC_VEIN = 20
    LESION_1 = 21
    LESION_2 = 22
    LESION_3 = 23


LESION_TISSUES = (Tissue.LESION_1, Tissue.LESION_2, Tissue.LESION_3)
LIVER_TISSUES = frozenset({Tissue.LIVER, Tissue.PORTAL_VEIN, Tissue.HEPATIC_VEIN, *LESION_TISSUES})
_N_TISSUES = len(Tissue)
_LIVER_SHARE = np.isin(np.arange(_N_TISSUES), list(LIVER_TISSUES)).astype(np.float32)
_LESION_SHARE = np.isin(np.arange(_N_TISSUES), list(LESION_TISSUES)).astype(np.float32)


@dataclass
class PhantomCTCase:
    """One synthetic CT study. `image` is HU as the scanner stores it (integers in float32);
    `spacing` is (z, y, x) like the array; `origin` and `direction` are in patient order (x, y, z),
    as DICOM and SimpleITK state them; `metadata` holds what ingestion keeps of a CT header."""

    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = IDENTITY_DIRECTION
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_record(self, case_id: str) -> dict[str, Any]:
        """The plain-dict case record a datasite hands to the training code."""
        return make_case_record(case_id, self.image, self.mask, self.spacing, self.origin, self.direction, self.metadata)


# Shapes in patient millimetres. Every shape takes broadcastable (z, y, x) arrays, so the same
# code fills a grid window and answers for a list of points.

Region = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class _Waves:
    """A smooth random field in [-1, 1]: plane waves with amplitudes summing to 1, so it is bounded
    and independent of any sampling grid."""

    directions: np.ndarray  # [n, 3] unit vectors (x, y, z)
    wavenumbers: np.ndarray
    phases: np.ndarray
    amplitudes: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, n_modes: int, wavelength_mm: tuple[float, float], planar: bool = False) -> _Waves:
        directions = rng.normal(size=(n_modes, 3))
        if planar:
            directions[:, 2] = 0.0
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        amplitudes = rng.uniform(0.5, 1.0, size=n_modes)
        return cls(
            directions=directions,
            wavenumbers=2 * np.pi / rng.uniform(*wavelength_mm, size=n_modes),
            phases=rng.uniform(0, 2 * np.pi, size=n_modes),
            amplitudes=amplitudes / amplitudes.sum(),
        )

    def __call__(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        total = np.zeros(np.broadcast_shapes(np.shape(z), np.shape(y), np.shape(x)), dtype=np.float32)
        for (dx, dy, dz), k, phase, amplitude in zip(self.directions, self.wavenumbers, self.phases, self.amplitudes):
            total += float(amplitude) * np.cos(float(k * dx) * x + float(k * dy) * y + float(k * dz) * z + float(phase))
        return total


@dataclass(frozen=True)
class _Ellipsoid:
    """An ellipsoid with `semi_axes` along the columns of `rotation`, optionally with its surface
    rippled by `waves` (relative amplitude `ripple`)."""

    centre: np.ndarray  # (x, y, z) mm
    semi_axes: np.ndarray
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    waves: _Waves | None = None
    ripple: float = 0.0

    def radius(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Normalised radius: 1 on the surface, below 1 inside."""
        offsets = (x - float(self.centre[0]), y - float(self.centre[1]), z - float(self.centre[2]))
        squared = 0.0
        for axis in range(3):
            local = sum(float(self.rotation[row, axis]) * offsets[row] for row in range(3))
            squared = squared + (local * float(1.0 / self.semi_axes[axis])) ** 2
        radius = np.sqrt(squared)
        if self.waves is not None:
            radius = radius * (1.0 + self.ripple * self.waves(*offsets[::-1]))
        return radius

    def inside(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return self.radius(z, y, x) <= 1.0

    def bounds(self, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned (low, high) corners in (x, y, z), widened by the ripple."""
        half = np.sqrt(((self.rotation * self.semi_axes) ** 2).sum(axis=1)) * scale / (1.0 - self.ripple)
        return self.centre - half, self.centre + half


@dataclass(frozen=True)
class _Outline:
    """A z-invariant cross-section (body, muscle wall): a superellipse with a rippled edge."""

    centre: tuple[float, float]
    semi_axes: tuple[float, float]
    exponent: float
    waves: _Waves
    ripple: float

    def inside(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        dx, dy = x - self.centre[0], y - self.centre[1]
        power = np.abs(dx / self.semi_axes[0]) ** self.exponent + np.abs(dy / self.semi_axes[1]) ** self.exponent
        radius = power ** (1 / self.exponent)
        return radius * (1.0 + self.ripple * self.waves(0.0, dy, dx)) <= 1.0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.array(self.semi_axes) / (1.0 - self.ripple)
        return (np.array([self.centre[0] - half[0], self.centre[1] - half[1], -np.inf]),
                np.array([self.centre[0] + half[0], self.centre[1] + half[1], np.inf]))


@dataclass(frozen=True)
class _Tube:
    """A vessel segment from `start` to `end` (x, y, z mm) whose radius tapers linearly."""

    start: np.ndarray
    end: np.ndarray
    start_radius: float
    end_radius: float

    def inside(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        axis = self.end - self.start
        offsets = (x - float(self.start[0]), y - float(self.start[1]), z - float(self.start[2]))
        along = sum(float(axis[i]) * offsets[i] for i in range(3)) * float(1.0 / (axis @ axis))
        along = np.clip(along, 0.0, 1.0)
        distance_sq = sum((offsets[i] - along * float(axis[i])) ** 2 for i in range(3))
        radius = self.start_radius + (self.end_radius - self.start_radius) * along
        return distance_sq <= radius**2

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        reach = max(self.start_radius, self.end_radius)
        return np.minimum(self.start, self.end) - reach, np.maximum(self.start, self.end) + reach


@dataclass(frozen=True)
class _Diaphragm:
    """The diaphragm as a height field: two domes (the right one higher), sloping down towards
    the back, where the lungs' costophrenic recesses reach lowest."""

    right_apex: np.ndarray  # (x, y, z)
    left_apex: np.ndarray
    curvature_radius_mm: float
    posterior_slope: float

    def height(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        domes = []
        for apex in (self.right_apex, self.left_apex):
            dx, dy = x - float(apex[0]), y - float(apex[1])
            domes.append(float(apex[2]) - (dx**2 + dy**2) * float(0.5 / self.curvature_radius_mm) - self.posterior_slope * dy)
        return np.maximum(*domes)


@dataclass(frozen=True)
class _LiverShape:
    """Lobes (right, left, caudate, inferior right) blended by a soft minimum of their radii, so
    they merge smoothly as a real liver's segments do, with a rippled surface."""

    lobes: tuple[_Ellipsoid, ...]
    waves: _Waves
    anchor: np.ndarray
    scale: float
    clip: Region  # where the liver may be: the abdomen below the diaphragm
    ripple: float = 0.08
    blend: float = 10.0

    def radius(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Normalised radius of the unclipped liver: below 1 inside, smaller deeper in."""
        total = 0.0
        for lobe in self.lobes:
            total = total + np.exp(-self.blend * lobe.radius(z, y, x))
        union = -np.log(total) / self.blend
        local = [(c - float(a)) * float(1.0 / self.scale) for c, a in zip((x, y, z), self.anchor)]
        return union * (1.0 + self.ripple * self.waves(local[2], local[1], local[0]))

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        # The soft minimum lies below every lobe's radius by at most log(n) / blend.
        reach = 1.0 / (1.0 - self.ripple) + math.log(len(self.lobes)) / self.blend
        corners = [lobe.bounds(reach) for lobe in self.lobes]
        return np.min([low for low, _ in corners], axis=0), np.max([high for _, high in corners], axis=0)

    def inside(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return (self.radius(z, y, x) <= 1.0) & self.clip(z, y, x)

    def stroke(self) -> _Stroke:
        return _stroke(Tissue.LIVER, self)


@dataclass(frozen=True)
class _Stroke:
    """Paint `tissue` where `region` holds, over whatever was there, or only over the tissues in
    `within`; `low`/`high` (x, y, z mm) bound the region so a grid evaluates it only there."""

    tissue: Tissue
    region: Region
    low: np.ndarray
    high: np.ndarray
    within: frozenset[Tissue] | None = None


def _stroke(tissue: Tissue, shape: Any, region: Region | None = None, within: frozenset[Tissue] | None = None) -> _Stroke:
    """A stroke filling `shape` (or `region`, bounded by `shape`)."""
    low, high = shape.bounds()
    return _Stroke(tissue, region or shape.inside, np.asarray(low, float), np.asarray(high, float), within)


def _paint_grid(strokes: Sequence[_Stroke], z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Tissue ids [Z, Y, X] on the grid of 1-D coordinate vectors z, y, x (mm)."""
    tissue = np.zeros((len(z), len(y), len(x)), dtype=np.uint8)
    for stroke in strokes:
        windows = [np.searchsorted(axis, [lo, hi]) for axis, lo, hi in ((z, stroke.low[2], stroke.high[2]),
                                                                      (y, stroke.low[1], stroke.high[1]),
                                                                      (x, stroke.low[0], stroke.high[0]))]
        (z0, z1), (y0, y1), (x0, x1) = ((int(a), int(b)) for a, b in windows)
        if z0 >= z1 or y0 >= y1 or x0 >= x1:
            continue
        view = tissue[z0:z1, y0:y1, x0:x1]
        inside = np.broadcast_to(stroke.region(z[z0:z1, None, None], y[None, y0:y1, None], x[None, None, x0:x1]), view.shape)
        if stroke.within is not None:
            inside = inside & np.isin(view, list(stroke.within))
        view[inside] = stroke.tissue
    return tissue


def _tissue_at(strokes: Sequence[_Stroke], points: np.ndarray) -> np.ndarray:
    """Tissue ids at points [N, 3] (x, y, z mm): the same painting, without a grid."""
    x, y, z = (points[:, i].astype(np.float32) for i in range(3))
    tissue = np.zeros(len(points), dtype=np.uint8)
    for stroke in strokes:
        inside = np.broadcast_to(stroke.region(z, y, x), tissue.shape)
        if stroke.within is not None:
            inside = inside & np.isin(tissue, list(stroke.within))
        tissue[inside] = stroke.tissue
    return tissue


@dataclass
class _Patient:
    """Everything random about one patient, drawn before any grid exists."""

    strokes: list[_Stroke]
    hu: np.ndarray  # per Tissue
    texture_hu: np.ndarray  # per Tissue: amplitude of the parenchymal texture
    texture: _Waves
    table_z_mm: float


def _around_z(degrees: float) -> np.ndarray:
    return Rotation.from_euler("z", degrees, degrees=True).as_matrix()


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    return Rotation.from_euler("zyx", rng.uniform(-180, 180, size=3), degrees=True).as_matrix()


def _tissue_hu(profile: CTScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """HU of every tissue for this patient. Enhancement (phase HU minus unenhanced HU) scales with
    one patient factor (cardiac output, weight and injection vary: +-15 %), plus a few HU each."""
    phase, plain = profile.contrast, NON_CONTRAST
    enhancement = rng.uniform(0.85, 1.15)

    def enhanced(name: str) -> float:
        return getattr(plain, name) + enhancement * (getattr(phase, name) - getattr(plain, name)) + rng.uniform(-3, 3)

    hu = np.zeros(_N_TISSUES, dtype=np.float32)
    hu[Tissue.AIR] = -1000.0
    hu[Tissue.FAT] = rng.uniform(-115, -90)
    hu[Tissue.MUSCLE] = enhanced("muscle_hu")
    hu[Tissue.LUNG] = rng.uniform(-870, -820)  # aerated lung bases
    hu[Tissue.HEART] = enhanced("heart_hu")
    hu[Tissue.CANCELLOUS_BONE] = rng.uniform(380, 520)  # lumbar vertebral body of an adult (lower with age)
    hu[Tissue.CORTICAL_BONE] = rng.uniform(800, 950)
    hu[Tissue.DISC] = rng.uniform(70, 100)
    hu[Tissue.CSF] = rng.uniform(5, 15)
    hu[Tissue.AORTA] = enhanced("aorta_hu")
    hu[Tissue.IVC] = enhanced("ivc_hu")
    hu[Tissue.KIDNEY_CORTEX] = enhanced("kidney_cortex_hu")
    hu[Tissue.KIDNEY_MEDULLA] = enhanced("kidney_medulla_hu")
    hu[Tissue.SPLEEN] = enhanced("spleen_hu")
    hu[Tissue.BOWEL_WALL] = enhanced("bowel_wall_hu")
    hu[Tissue.GAS] = -1000.0
    hu[Tissue.FLUID] = rng.uniform(5, 25)  # bowel and gastric fluid
    hu[Tissue.GALLBLADDER] = rng.uniform(0, 20)  # bile
    hu[Tissue.LIVER] = enhanced("liver_hu")
    hu[Tissue.PORTAL_VEIN] = enhanced("portal_vein_hu")
    hu[Tissue.HEPATIC_VEIN] = enhanced("hepatic_vein_hu")
    return hu


def _texture_hu(profile: CTScannerProfile) -> np.ndarray:
    """Amplitude (HU) of the smooth parenchymal texture per tissue: mild in liver and muscle, strong
    in lung (small vessels) and in the arterial-phase spleen."""
    texture = np.zeros(_N_TISSUES, dtype=np.float32)
    texture[[Tissue.FAT, Tissue.MUSCLE, Tissue.LIVER, Tissue.KIDNEY_CORTEX]] = (8.0, 4.0, 5.0, 5.0)
    texture[Tissue.LUNG] = 40.0
    texture[Tissue.CANCELLOUS_BONE] = 40.0
    texture[Tissue.SPLEEN] = profile.contrast.spleen_texture_hu
    texture[list(LESION_TISSUES)] = 8.0
    return texture


@dataclass(frozen=True)
class _Torso:
    """The frame the organs are placed in: body wall, spine and great vessels, diaphragm."""

    centre_x: float
    centre_y: float
    cavity: _Outline  # inside the abdominal wall muscles
    cavity_half_width: float
    cavity_half_depth: float
    vertebra_y: float
    ivc_xy: tuple[float, float]
    aorta_xyr: tuple[float, float, float]
    diaphragm: _Diaphragm

    def abdomen(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Below the diaphragm muscle, inside the abdominal wall."""
        return self.cavity.inside(z, y, x) & (z <= self.diaphragm.height(y, x) - 5.0)

    def in_abdomen(self, shape: Any) -> Region:
        return lambda z, y, x: shape.inside(z, y, x) & self.abdomen(z, y, x)


def _draw_torso(rng: np.random.Generator, fov_mm: float) -> tuple[_Torso, list[_Stroke]]:
    """The body (fat, abdominal wall), lung bases over the diaphragm domes and the heart on it.

    The body is a boxy ellipse 300-360 mm wide kept inside the reconstructed field of view; adults'
    girth differs mostly by subcutaneous fat (8-30 mm), less by the abdomen inside it. The slab's
    centre is z = 0; the right dome is 8-20 mm above the left."""
    adiposity = rng.uniform()
    half_width = min(150.0 + 30.0 * adiposity, 0.47 * fov_mm)
    half_depth = min(half_width * rng.uniform(0.74, 0.86), 0.47 * fov_mm)
    centre_x, centre_y = rng.uniform(-8, 8), rng.uniform(-10, 10)
    fat_mm, wall_mm = 8.0 + 18.0 * adiposity + rng.uniform(0, 4), rng.uniform(8, 12)
    outline_waves = _Waves.draw(rng, 4, (150, 320), planar=True)
    exponent = rng.uniform(2.1, 2.5)

    def outline(depth_mm: float) -> _Outline:
        return _Outline((centre_x, centre_y), (half_width - depth_mm, half_depth - depth_mm), exponent, outline_waves, 0.03)

    body, muscle_wall, cavity = outline(0.0), outline(fat_mm), outline(fat_mm + wall_mm)
    vertebra_y = centre_y + half_depth - fat_mm - wall_mm - rng.uniform(63, 71)  # spinous process tip at the back wall
    right_dome_z = rng.uniform(62, 72)
    torso = _Torso(
        centre_x=centre_x,
        centre_y=centre_y,
        cavity=cavity,
        cavity_half_width=half_width - fat_mm - wall_mm,
        cavity_half_depth=half_depth - fat_mm - wall_mm,
        vertebra_y=vertebra_y,
        ivc_xy=(centre_x - rng.uniform(20, 28), vertebra_y - rng.uniform(22, 28)),
        aorta_xyr=(centre_x + rng.uniform(8, 20), vertebra_y - rng.uniform(28, 34), rng.uniform(10, 13)),
        diaphragm=_Diaphragm(
            right_apex=np.array([centre_x - 65, centre_y + rng.uniform(-10, 10), right_dome_z]),
            left_apex=np.array([centre_x + 65, centre_y + rng.uniform(-5, 15), right_dome_z - rng.uniform(8, 20)]),
            curvature_radius_mm=rng.uniform(115, 145),
            posterior_slope=rng.uniform(0.15, 0.3),
        ),
    )
    height = torso.diaphragm.height
    heart = _Ellipsoid(np.array([centre_x + 25, centre_y - 25, right_dome_z + 35]),
                       np.array([65.0, 50.0, 55.0]) * rng.uniform(0.9, 1.1), _around_z(30))
    strokes = [
        _stroke(Tissue.FAT, body),
        _stroke(Tissue.MUSCLE, muscle_wall),
        _stroke(Tissue.FAT, cavity),
        _stroke(Tissue.LUNG, cavity, lambda z, y, x: cavity.inside(z, y, x) & (z > height(y, x))),
        _stroke(Tissue.MUSCLE, cavity, lambda z, y, x: cavity.inside(z, y, x) & (z > height(y, x) - 5.0) & (z <= height(y, x))),
        _stroke(Tissue.HEART, heart, lambda z, y, x: heart.inside(z, y, x) & cavity.inside(z, y, x) & (z > height(y, x) + 2.0)),
    ]
    return torso, strokes


def _viscera_strokes(torso: _Torso, rng: np.random.Generator) -> list[_Stroke]:
    """Bowel loops (fluid-filled or with gas) in the mid and lower abdomen; the stomach under the
    left dome with gas floating anteriorly over fluid (the patient is supine); the spleen."""
    strokes = []
    top_z = torso.diaphragm.right_apex[2]
    for _ in range(int(rng.integers(6, 11))):
        loop = _Ellipsoid(
            np.array([torso.centre_x + rng.uniform(-0.6, 0.6) * torso.cavity_half_width,
                      torso.centre_y + rng.uniform(-0.7, 0.2) * torso.cavity_half_depth,
                      top_z - rng.uniform(70, 170)]),
            rng.uniform(14, 26, size=3), _random_rotation(rng))
        lumen = _Ellipsoid(loop.centre, loop.semi_axes * 0.72, loop.rotation)
        strokes.append(_stroke(Tissue.BOWEL_WALL, loop, torso.in_abdomen(loop)))
        strokes.append(_stroke(Tissue.GAS if rng.random() < 0.3 else Tissue.FLUID, lumen, torso.in_abdomen(lumen)))
    left_dome_z = torso.diaphragm.left_apex[2]
    stomach = _Ellipsoid(
        np.array([torso.centre_x + rng.uniform(35, 55), torso.centre_y - rng.uniform(15, 35), left_dome_z - rng.uniform(45, 60)]),
        np.array([45.0, 40.0, 55.0]) * rng.uniform(0.8, 1.1), _around_z(rng.uniform(-30, 0)))
    lumen = _Ellipsoid(stomach.centre, stomach.semi_axes * 0.88, stomach.rotation)
    gas_level_y = stomach.centre[1] - stomach.semi_axes[1] * rng.uniform(0.1, 0.5)
    spleen = _Ellipsoid(
        np.array([torso.centre_x + torso.cavity_half_width - rng.uniform(28, 36), torso.centre_y + rng.uniform(25, 45),
                  left_dome_z - rng.uniform(40, 55)]),
        np.array([rng.uniform(22, 30), rng.uniform(45, 60), rng.uniform(45, 60)]), _around_z(rng.uniform(-40, -25)),
        _Waves.draw(rng, 4, (40, 120)), 0.06)
    strokes += [
        _stroke(Tissue.BOWEL_WALL, stomach, torso.in_abdomen(stomach)),
        _stroke(Tissue.FLUID, lumen, torso.in_abdomen(lumen)),
        _stroke(Tissue.GAS, lumen, lambda z, y, x: torso.in_abdomen(lumen)(z, y, x) & (y < gas_level_y)),
        _stroke(Tissue.SPLEEN, spleen, torso.in_abdomen(spleen)),
    ]
    return strokes


def _liver_anchor(torso: _Torso) -> np.ndarray:
    """Where the liver hangs from: beside the IVC, under the right dome."""
    ivc_x, ivc_y = torso.ivc_xy
    return np.array([ivc_x + 6, ivc_y - 6, torso.diaphragm.right_apex[2]])


def _indenting_strokes(torso: _Torso, rng: np.random.Generator) -> list[_Stroke]:
    """Organs painted after the liver, where they indent it: gallbladder (absent after
    cholecystectomy), kidneys, psoas, IVC, aorta, back muscles and spine."""
    strokes = []
    anchor = _liver_anchor(torso)
    if rng.random() < 0.85:
        gallbladder = _Ellipsoid(anchor + np.array([-45, -50, -110]) + rng.uniform(-8, 8, size=3),
                                 np.array([16.0, 18.0, 32.0]) * rng.uniform(0.8, 1.2),
                                 Rotation.from_euler("zx", [rng.uniform(-30, 30), rng.uniform(30, 50)], degrees=True).as_matrix())
        strokes.append(_stroke(Tissue.GALLBLADDER, gallbladder, torso.in_abdomen(gallbladder)))
    for side, dome in ((-1, torso.diaphragm.right_apex), (1, torso.diaphragm.left_apex)):
        kidney = _Ellipsoid(
            np.array([torso.centre_x + side * rng.uniform(60, 70), torso.vertebra_y + rng.uniform(5, 15),
                      dome[2] - rng.uniform(110, 130)]),
            np.array([26.0, 24.0, 52.0]) * rng.uniform(0.9, 1.1, size=3),
            Rotation.from_euler("yx", [side * -15, -15], degrees=True).as_matrix())
        medulla = _Ellipsoid(kidney.centre, kidney.semi_axes * 0.68, kidney.rotation)
        strokes.append(_stroke(Tissue.KIDNEY_CORTEX, kidney, torso.in_abdomen(kidney)))
        strokes.append(_stroke(Tissue.KIDNEY_MEDULLA, medulla, torso.in_abdomen(medulla)))
    psoas_top_z = torso.diaphragm.right_apex[2] - rng.uniform(90, 110)
    for side in (-1, 1):
        strokes.append(_Stroke(Tissue.MUSCLE, _psoas(torso.centre_x, torso.vertebra_y, side, psoas_top_z),
                               np.array([torso.centre_x - 70, torso.vertebra_y - 30, -np.inf]),
                               np.array([torso.centre_x + 70, torso.vertebra_y + 30, psoas_top_z])))
    (ivc_x, ivc_y), ivc_top_z = torso.ivc_xy, torso.diaphragm.right_apex[2] + 10  # it enters the right atrium
    strokes.append(_Stroke(Tissue.IVC, _column(ivc_x, ivc_y, 13.0, 9.0, top_z=ivc_top_z),
                           np.array([ivc_x - 13, ivc_y - 9, -np.inf]), np.array([ivc_x + 13, ivc_y + 9, ivc_top_z])))
    aorta_x, aorta_y, aorta_r = torso.aorta_xyr
    strokes.append(_Stroke(Tissue.AORTA, _column(aorta_x, aorta_y, aorta_r, aorta_r),
                           np.array([aorta_x - aorta_r, aorta_y - aorta_r, -np.inf]),
                           np.array([aorta_x + aorta_r, aorta_y + aorta_r, np.inf])))
    strokes.extend(_spine_strokes(torso.centre_x, torso.vertebra_y, rng))
    return strokes


def _fitted_liver(torso: _Torso, indenting: Sequence[_Stroke], rng: np.random.Generator,
                  points_rng: np.random.Generator) -> _LiverShape:
    """A lobed liver of the drawn volume (1.3-1.9 L counted where the indenting organs leave it).

    Lobes are offsets from the anchor fitted in-plane to the abdomen (the right lobe reaches the
    right wall, the liver spans the abdomen's depth), then scaled as a whole to the volume, which
    is measured on random points. The abdominal wall, diaphragm and spine clip the liver, so its
    volume grows more slowly than the cube of its scale: secant steps on log volume against log
    scale find it, within a realistic range of scales (a liver does not grow twice as long to make
    up for a narrow abdomen).
    """
    anchor = _liver_anchor(torso)
    habitus = np.array([(anchor[0] - torso.centre_x + torso.cavity_half_width) / 125.0, torso.cavity_half_depth / 100.0, 1.0])
    lobe_specs = (  # centre offset, semi-axes (x, y, z mm), rotation about z (degrees)
        ((-72, 5, -58), (68, 80, 60) * rng.uniform(0.9, 1.1, size=3), rng.uniform(-10, 10)),  # right lobe
        ((55, -45, -32), (62, 34, 28) * rng.uniform(0.8, 1.2, size=3), rng.uniform(5, 20)),  # left lobe
        ((5, 14, -48), (20, 18, 26) * rng.uniform(0.9, 1.1, size=3), 0.0),  # caudate lobe
        ((-72, 15, -92), (42, 48, 28) * rng.uniform(0.8, 1.1, size=3), rng.uniform(-15, 15)),  # inferior right lobe
    )
    waves = _Waves.draw(rng, 6, (50, 150))
    target_ml = rng.uniform(*LIVER_VOLUME_ML)

    def liver_at(scale: float) -> _LiverShape:
        lobes = tuple(_Ellipsoid(anchor + scale * habitus * offset, scale * habitus * semi, _around_z(angle))
                      for offset, semi, angle in lobe_specs)
        return _LiverShape(lobes, waves, anchor, scale, torso.abdomen)

    def log_volume_ml(scale: float) -> float:
        stroke = liver_at(scale).stroke()
        points = points_rng.uniform(stroke.low, stroke.high, size=(6000, 3))
        share = np.mean(_tissue_at([stroke, *indenting], points) == Tissue.LIVER)
        return math.log(float(share * np.prod(stroke.high - stroke.low)) / 1000.0)

    log_target, log_limits = math.log(target_ml), np.log(_LIVER_SCALE_LIMITS)
    log_scales, log_volumes = [0.0], [log_volume_ml(1.0)]
    log_scales.append(float(np.clip((log_target - log_volumes[0]) / 3, *log_limits)))
    for _ in range(2):
        log_volumes.append(log_volume_ml(math.exp(log_scales[-1])))
        step = log_scales[-1] - log_scales[-2]
        slope = (log_volumes[-1] - log_volumes[-2]) / step if abs(step) > 1e-6 else 3.0
        log_scales.append(float(np.clip(log_scales[-1] + (log_target - log_volumes[-1]) / max(slope, 1.5), *log_limits)))
    return liver_at(math.exp(log_scales[-1]))


def _lesion_strokes(profile: CTScannerProfile, liver: _LiverShape, strokes: Sequence[_Stroke], hu: np.ndarray,
                    rng: np.random.Generator, points_rng: np.random.Generator) -> list[_Stroke]:
    """0-3 lesions (one case in five has none) of radius 5-25 mm (log-uniform: small ones are
    commoner), centred among the deeper half of liver points and confined to the liver; their HU
    (set in `hu`) follow the phase: hypodense, or in the arterial phase sometimes hyperenhancing."""
    lesion_strokes = []
    stroke = liver.stroke()
    points = points_rng.uniform(stroke.low, stroke.high, size=(6000, 3))
    in_liver = points[_tissue_at(strokes, points) == Tissue.LIVER]
    depth = liver.radius(*(in_liver[:, i].astype(np.float32) for i in (2, 1, 0)))
    deep = in_liver[depth <= np.median(depth)]
    phase = profile.contrast
    n_lesions = int(rng.choice(len(LESION_COUNT_PROBABILITIES), p=LESION_COUNT_PROBABILITIES))
    for tissue in LESION_TISSUES[:n_lesions]:
        radius = math.exp(rng.uniform(*np.log(LESION_RADIUS_MM)))
        lesion = _Ellipsoid(deep[rng.integers(len(deep))], radius * rng.uniform(0.8, 1.2, size=3), _random_rotation(rng),
                            _Waves.draw(rng, 4, (radius, 4 * radius)), 0.1)
        lesion_strokes.append(_stroke(tissue, lesion, within=LIVER_TISSUES))
        hyperenhancing = rng.random() < phase.hyperenhancing_lesion_fraction
        hu[tissue] = rng.uniform(*(phase.hyperenhancing_lesion_hu if hyperenhancing else phase.hypodense_lesion_hu))
    return lesion_strokes


def _draw_patient(profile: CTScannerProfile, rng: np.random.Generator, fov_mm: float) -> _Patient:
    """Draw a patient: body habitus, organ sizes and positions, liver shape and volume, vessels,
    lesions and tissue HU. Every draw is in millimetres, independent of the grid."""
    torso, strokes = _draw_torso(rng, fov_mm)
    strokes += _viscera_strokes(torso, rng)
    indenting = _indenting_strokes(torso, rng)
    points_rng = np.random.default_rng(rng.integers(2**63))
    liver = _fitted_liver(torso, indenting, rng, points_rng)
    strokes += [liver.stroke(), *indenting, *_vessel_strokes(_liver_anchor(torso), liver.scale, rng)]
    hu = _tissue_hu(profile, rng)
    strokes += _lesion_strokes(profile, liver, strokes, hu, rng, points_rng)
    return _Patient(strokes=strokes, hu=hu, texture_hu=_texture_hu(profile), texture=_Waves.draw(rng, 10, (6, 24)),
                    table_z_mm=round(float(rng.uniform(-250, 50)), 1))


def _column(centre_x: float, centre_y: float, semi_x: float, semi_y: float, top_z: float = np.inf) -> Region:
    """An elliptical cylinder along z up to `top_z` (aorta, IVC)."""
    return lambda z, y, x: (((x - centre_x) / semi_x) ** 2 + ((y - centre_y) / semi_y) ** 2 <= 1.0) & (z <= top_z)


def _psoas(centre_x: float, vertebra_y: float, side: int, top_z: float) -> Region:
    """A psoas muscle beside the vertebral body, from a point at `top_z` widening downwards to 22 mm."""
    def region(z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        radius = np.clip((top_z - z) * 0.25, 0.0, 22.0)
        middle_x = centre_x + side * (24.0 + radius)
        return ((x - middle_x) ** 2 + ((y - vertebra_y) / 0.85) ** 2 < radius**2)
    return region


def _spine_strokes(centre_x: float, vertebra_y: float, rng: np.random.Generator) -> list[_Stroke]:
    """Back muscles, vertebral arch, spinous process, vertebral body (cortex, cancellous bone and
    discs every ~35 mm) and the spinal canal."""
    strokes = []
    for side in (-1, 1):
        muscle = _Outline((centre_x + side * 38, vertebra_y + 42), (26.0, 24.0), 2.0,
                          _Waves.draw(rng, 2, (100, 200), planar=True), 0.05)
        strokes.append(_stroke(Tissue.MUSCLE, muscle))

    def ring(y: float, semi: tuple[float, float]) -> _Outline:
        return _Outline((centre_x, y), semi, 2.0, _Waves.draw(rng, 2, (60, 120), planar=True), 0.02)

    body = ring(vertebra_y, (22.0, 17.0))
    disc_period, disc_height, disc_phase = rng.uniform(32, 38), rng.uniform(7, 10), rng.uniform(0, 38)
    strokes += [
        _stroke(Tissue.CORTICAL_BONE, ring(vertebra_y + 32, (20.0, 16.0))),
        _stroke(Tissue.CORTICAL_BONE, ring(vertebra_y + 52, (5.0, 16.0))),
        _stroke(Tissue.CORTICAL_BONE, body),
        _stroke(Tissue.CANCELLOUS_BONE, ring(vertebra_y, (19.0, 14.0))),
        _stroke(Tissue.DISC, body, lambda z, y, x: body.inside(z, y, x) & (np.mod(z - disc_phase, disc_period) < disc_height)),
        _stroke(Tissue.CSF, ring(vertebra_y + 30, (10.0, 9.0))),
    ]
    return strokes


def _vessel_strokes(anchor: np.ndarray, scale: float, rng: np.random.Generator) -> list[_Stroke]:
    """Portal vein branches from the hilum and three hepatic veins converging on the IVC, inside
    the liver only (offsets from the liver's anchor, scaled with the liver)."""
    def at(offset: tuple[float, float, float]) -> np.ndarray:
        return anchor + scale * (np.array(offset, float) + rng.uniform(-6, 6, size=3))

    hilum, right_portal = at((-10, 5, -80)), at((-55, 12, -68))
    tubes = [(Tissue.PORTAL_VEIN, _Tube(hilum, right_portal, 8.0, 6.0)),
             (Tissue.PORTAL_VEIN, _Tube(hilum, at((60, -40, -40)), 5.0, 3.0))]
    for target in ((-95, -30, -55), (-95, 45, -90), (-70, 0, -20), (-45, 40, -115)):
        tubes.append((Tissue.PORTAL_VEIN, _Tube(right_portal, at(target), 5.0, 3.0)))
    confluence = at((0, 0, -18))
    for target in ((-105, 20, -30), (-40, -55, -40), (50, -35, -25)):
        tubes.append((Tissue.HEPATIC_VEIN, _Tube(confluence, at(target), 6.5, 3.0)))
    return [_stroke(tissue, tube, within=frozenset({Tissue.LIVER})) for tissue, tube in tubes]


def _ct_noise(shape: tuple[int, int, int], sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance CT noise per slice with the texture of filtered back-projection: noise power
    rises with frequency (the ramp filter) until the kernel's apodisation cuts it, so a smooth
    kernel gives coarse grain and a sharp one fine grain (NPS(f) ~ |f| MTF(f)^2)."""
    _, rows, cols = shape
    fy = np.fft.fftfreq(rows)[:, None]

    def amplitude(fx: np.ndarray) -> np.ndarray:
        frequency_sq = fy**2 + fx**2
        return frequency_sq**0.25 * np.exp(-2 * np.pi**2 * sigma_px**2 * frequency_sq)

    # Filtering unit white noise with amplitude A gives noise of variance mean(A^2) over all frequencies.
    sd = math.sqrt(float(np.mean(amplitude(np.fft.fftfreq(cols)[None, :]) ** 2)))
    filter_half = (amplitude(np.fft.rfftfreq(cols)[None, :]) / sd).astype(np.float32)
    white = rng.standard_normal(shape, dtype=np.float32)
    return scipy.fft.irfft2(scipy.fft.rfft2(white) * filter_half, s=(rows, cols)).astype(np.float32)


def _acquisition_metadata(profile: CTScannerProfile) -> dict[str, str | float]:
    """The header facts ingestion keeps for a CT series, with the types it gives them."""
    return {
        "Modality": "CT",
        "Manufacturer": profile.manufacturer,
        "ManufacturerModelName": profile.model_name,
        "BodyPartExamined": "ABDOMEN",
        "ConvolutionKernel": profile.convolution_kernel,
        "SliceThickness": float(profile.slice_thickness_mm),
        "SpacingBetweenSlices": float(profile.slice_thickness_mm),
        "KVP": float(profile.kvp),
    }


def generate_case(profile: CTScannerProfile, rng: np.random.Generator, matrix: int = 96, fov_mm: float | None = None,
                  z_extent_mm: float = 180.0) -> PhantomCTCase:
    """One axial abdominal CT study as the profile's scanner acquires it.

    `matrix` x `matrix` pixels over `fov_mm` (default: the profile's reconstruction field of view,
    which is how the hospitals' pixel sizes differ) and about `z_extent_mm` of slices of the
    profile's thickness (contiguous: spacing = thickness), covering the liver from the lung bases
    down. The patient is drawn first and the noise last, so a seed gives the same patient at any
    `matrix`.
    """
    if not isinstance(matrix, (int, np.integer)) or matrix < 16:
        raise ValueError(f"matrix must be an integer of at least 16 pixels, got {matrix!r}")
    fov = profile.reconstruction_fov_mm if fov_mm is None else float(fov_mm)
    if not 250.0 <= fov <= 600.0:
        raise ValueError(f"fov_mm must be an abdominal field of view of 250-600 mm, got {fov_mm}")
    thickness = profile.slice_thickness_mm
    n_slices = int(round(z_extent_mm / thickness))
    if n_slices < 2:
        raise ValueError(f"z_extent_mm must cover at least two {thickness} mm slices, got {z_extent_mm}")

    patient = _draw_patient(profile, rng, fov)
    pixel = profile.pixel_spacing_mm(matrix, fov)
    in_plane = ((np.arange(matrix) - (matrix - 1) / 2) * pixel).astype(np.float32)
    slice_z = (np.arange(n_slices) - (n_slices - 1) / 2) * thickness
    n_sub = math.ceil(thickness / _MAX_SUBSLICE_MM)
    sub_offsets = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * thickness
    fine_z = (slice_z[:, None] + sub_offsets[None, :]).ravel().astype(np.float32)

    tissue = _paint_grid(patient.strokes, fine_z, in_plane, in_plane)
    slab_shape = (n_slices, n_sub, matrix, matrix)
    hu = patient.hu[tissue].reshape(slab_shape).mean(axis=1)
    texture_hu = patient.texture_hu[tissue].reshape(slab_shape).mean(axis=1)
    liver_fraction = _LIVER_SHARE[tissue].reshape(slab_shape).mean(axis=1)
    lesion_fraction = _LESION_SHARE[tissue].reshape(slab_shape).mean(axis=1)
    mask = np.where(lesion_fraction >= 0.5, LESION, np.where(liver_fraction >= 0.5, LIVER, BACKGROUND)).astype(np.uint8)

    hu += texture_hu * patient.texture(slice_z.astype(np.float32)[:, None, None], in_plane[None, :, None], in_plane[None, None, :])
    sigma_px = profile.kernel_sigma_px
    image = gaussian_filter(hu, sigma=(0.0, sigma_px, sigma_px), mode="nearest")
    image += profile.noise_sd_hu * _ct_noise(image.shape, sigma_px, rng)
    image = np.clip(np.rint(image), *profile.stored_hu_range).astype(np.float32)

    corner = round(-(matrix - 1) / 2 * pixel, 4)
    origin = (corner, corner, round(float(slice_z[0]) + patient.table_z_mm, 4))
    return PhantomCTCase(
        image=image,
        mask=mask,
        spacing=(float(thickness), pixel, pixel),
        origin=origin,
        metadata=_acquisition_metadata(profile),
    )


def _site_key(profile_name: str) -> int:
    """A stable number per site, so each site's cases are their own random streams."""
    return zlib.crc32(profile_name.encode("utf-8"))


def case_seeds(seed: int, profile_name: str, index: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """(anatomy and scanner, file writing) seeds of case `index` of a site: depending only on
    (seed, site, index), so an in-memory fleet and a written site hold the same cases, and a
    bigger site starts with the same cases as a smaller one."""
    anatomy, files = np.random.SeedSequence(seed, spawn_key=(_site_key(profile_name), index)).spawn(2)
    return anatomy, files


def profile_named(name: str) -> CTScannerProfile:
    """The scanner profile of a hospital of the fleet, or a ValueError listing the known ones."""
    if name not in PROFILES:
        raise ValueError(f"unknown scanner profile {name!r}; known: {sorted(PROFILES)}")
    return PROFILES[name]


def case_id_of(profile_name: str, index: int) -> str:
    """The case (and patient) id of case `index` of a site, e.g. "hospital-a-0007"."""
    return f"{profile_name}-{index:04d}"


def phantom_fleet(cases_per_site: int | Mapping[str, int], seed: int = 0, profiles: Sequence[str] = DEFAULT_FLEET, *,
                  matrix: int = 96, fov_mm: float | None = None, z_extent_mm: float = 180.0) -> dict[str, list[dict[str, Any]]]:
    """In-memory case records per site, as ingestion would hand them over, for simulations.

    `cases_per_site` is one count for every site in `profiles`, or a {site: count} mapping whose
    keys are then the sites (`profiles` is used only with a single count). Deterministic in `seed`;
    case i of a site is the case `phantom_dicom.write_phantom_site` writes as patient i with the same seed.
    """
    if isinstance(cases_per_site, Mapping):
        counts = dict(cases_per_site)
    else:
        counts = {name: cases_per_site for name in profiles}
    for name, count in counts.items():
        profile_named(name)
        if not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"cases_per_site must be a non-negative integer per site, got {count!r} for {name!r}")
    fleet = {}
    for name, count in counts.items():
        profile = PROFILES[name]
        records = []
        for index in range(count):
            anatomy_seed, _ = case_seeds(seed, name, index)
            case = generate_case(profile, np.random.default_rng(anatomy_seed), matrix, fov_mm, z_extent_mm)
            records.append(case.as_record(case_id_of(name, index)))
        fleet[name] = records
    return fleet

"""Clinic profiles: what makes one clinic's depth frames differ from another's.

A CT vendor's weight and height estimate has to work at every clinic, and a clinic's frames differ
in ways a model trained elsewhere has not seen: the camera hangs higher or lower (the table is
further away, and farther readings are noisier), tables differ in height, width and the curve of
the cradle, cameras differ in field of view and sampling, sensors in noise and missing readings
(0 in the frame), and each clinic has its own routine (arms up for thorax-abdomen scans, feet
first, knee cushions and head rests, blankets over cold patients) and its own patient mix. Each
profile fixes those knobs for one synthetic clinic, so tests and benchmarks see a reproducible
domain shift.

Frames are the camera vendor's reprojection of the depth image onto a regular grid parallel to
the table (as camera software delivers it for patient positioning): rows run along the table,
columns across it, each pixel holds the distance from the camera to the surface in mm.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class PatientMix:
    """Adult patients: height per sex ~ normal (cm), BMI ~ lognormal (median, spread as a share),
    both clipped to the programme's ranges; weight = BMI * height²."""

    female_share: float = 0.5
    female_height_cm: tuple[float, float] = (163.0, 7.0)  # mean, standard deviation
    male_height_cm: tuple[float, float] = (177.0, 7.5)
    bmi_median: float = 26.0
    bmi_spread: float = 0.18
    height_range_cm: tuple[float, float] = (150.0, 200.0)
    bmi_range: tuple[float, float] = (17.0, 40.0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.female_share <= 1.0:
            raise ValueError(f"PatientMix.female_share must be in [0, 1], got {self.female_share}")
        if not self.bmi_range[0] <= self.bmi_median <= self.bmi_range[1]:
            raise ValueError(f"PatientMix.bmi_median {self.bmi_median} lies outside bmi_range {self.bmi_range}")


@dataclass(frozen=True)
class ClinicProfile:
    """One clinic's camera, table and routine. Lengths in mm, shares in [0, 1].

    The frame covers `field_of_view_mm` (along, across the table) sampled as `rows` x `cols`
    pixels, starting `view_start_mm` before the table's head end and shifted `view_lateral_mm`
    sideways; it must reach past the heels of a 2 m patient whose head lies at the far end of
    `head_position_mm`. `camera_tilt_deg` tilts the camera along the table (a gantry mount looks at the
    table obliquely). Depth noise grows with the square of the distance: `noise_mm` at 1.5 m.
    Readings beyond `max_range_mm` are missing (0), as are `dropout` of all pixels and, with
    probability `edge_dropout`, pixels on steep edges (a depth sensor's shadowing).
    """

    name: str
    manufacturer: str
    camera_model: str
    camera_height_mm: float
    table_height_mm: float
    table_width_mm: float
    table_length_mm: float
    table_curve_mm: float  # how much higher the cradle's edges are than its middle
    field_of_view_mm: tuple[float, float]
    rows: int
    cols: int
    noise_mm: float
    dropout: float
    patients: PatientMix = PatientMix()
    view_start_mm: float = -100.0
    view_lateral_mm: float = 0.0
    camera_tilt_deg: float = 0.0
    max_range_mm: float = 4000.0
    edge_dropout: float = 0.3
    arms_up: float = 0.5
    feet_first: float = 0.0
    head_position_mm: tuple[float, float] = (100.0, 250.0)  # where the head's top lies along the table
    lateral_sd_mm: float = 15.0
    yaw_sd_deg: float = 1.5
    headrest_mm: float = 0.0
    knee_cushion: float = 0.0  # share of patients with a cushion under the knees
    knee_cushion_mm: float = 90.0
    blanket: float = 0.0  # share of patients under a blanket
    blanket_mm: tuple[float, float] = (8.0, 25.0)

    def __post_init__(self) -> None:
        for name in ("dropout", "edge_dropout", "arms_up", "feet_first", "knee_cushion", "blanket"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"clinic {self.name}: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.rows < 8 or self.cols < 8:
            raise ValueError(f"clinic {self.name}: rows and cols must be >= 8, got {self.rows} x {self.cols}")
        if self.camera_height_mm - self.table_height_mm < 800:
            raise ValueError(f"clinic {self.name}: the camera ({self.camera_height_mm} mm) must hang at least 800 mm "
                             f"above the table ({self.table_height_mm} mm) to see a patient lying on it")
        if self.table_height_mm < 600:
            raise ValueError(f"clinic {self.name}: table_height_mm {self.table_height_mm} is below a CT table's 600 mm")

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]:
        """(along, across) the table, as DICOM PixelSpacing orders it (row spacing, column spacing)."""
        return (self.field_of_view_mm[0] / self.rows, self.field_of_view_mm[1] / self.cols)

    def with_size(self, rows: int, cols: int) -> ClinicProfile:
        """Same camera, table and field of view, sampled at `rows` x `cols`: tests need tiny frames,
        benchmarks full ones, and the scene should stay comparable between the two."""
        return replace(self, rows=rows, cols=cols)


PROFILES: dict[str, ClinicProfile] = {
    profile.name: profile
    for profile in (
        # A ceiling camera over a curved cradle, fine sampling, low noise; mostly arms up.
        ClinicProfile(
            name="clinic-a", manufacturer="MEDFED PHANTOM", camera_model="Ceiling 3D camera C1",
            camera_height_mm=2750.0, table_height_mm=880.0, table_width_mm=500.0, table_length_mm=2300.0,
            table_curve_mm=40.0, field_of_view_mm=(2500.0, 880.0), rows=250, cols=88, noise_mm=2.0, dropout=0.005,
            arms_up=0.6, blanket=0.1,
        ),
        # Lower ceiling, higher and flatter table, coarser and noisier sensor, many blankets, a
        # female-heavy mix (a women's clinic shares the scanner).
        ClinicProfile(
            name="clinic-b", manufacturer="MEDFED PHANTOM", camera_model="Ceiling 3D camera C1",
            camera_height_mm=2450.0, table_height_mm=960.0, table_width_mm=470.0, table_length_mm=2200.0,
            table_curve_mm=15.0, field_of_view_mm=(2500.0, 900.0), rows=200, cols=72, noise_mm=4.0, dropout=0.02,
            view_lateral_mm=40.0, arms_up=0.3, yaw_sd_deg=3.0, lateral_sd_mm=30.0, blanket=0.5,
            patients=PatientMix(female_share=0.7, bmi_median=25.0),
        ),
        # A high mount whose floor readings fall beyond the sensor's range, a head rest, a deep
        # cradle and a heavier (bariatric-programme) patient mix.
        ClinicProfile(
            name="clinic-c", manufacturer="MEDFED PHANTOM", camera_model="Wide-range depth camera W2",
            camera_height_mm=3050.0, table_height_mm=820.0, table_width_mm=520.0, table_length_mm=2400.0,
            table_curve_mm=55.0, field_of_view_mm=(2500.0, 960.0), rows=280, cols=104, noise_mm=3.0, dropout=0.01,
            max_range_mm=2900.0, arms_up=0.8, headrest_mm=60.0, blanket=0.15,
            patients=PatientMix(female_share=0.45, bmi_median=30.0, bmi_spread=0.2),
        ),
        # A camera on the gantry looking along the table at an angle, the noisiest sensor, knee
        # cushions, a third of the patients feet first, wide placement.
        ClinicProfile(
            name="clinic-d", manufacturer="MEDFED PHANTOM", camera_model="Gantry camera G3",
            camera_height_mm=2600.0, table_height_mm=900.0, table_width_mm=500.0, table_length_mm=2400.0,
            table_curve_mm=30.0, field_of_view_mm=(2550.0, 900.0), rows=225, cols=80, noise_mm=5.0, dropout=0.03,
            view_start_mm=-60.0, camera_tilt_deg=2.0, arms_up=0.5, feet_first=0.33, head_position_mm=(100.0, 350.0),
            knee_cushion=0.7, blanket=0.25,
        ),
    )
}

"""The synthetic depth-camera fleet: patients drawn per clinic, their frames, a clinic's export.

Frame i of a clinic depends only on (seed, i), so a bigger fleet with the same seed starts with
the same patients. `phantom_fleet` gives frames in memory (labels known exactly: the ground truth
a test measures a model against); `write_phantom_site` files them as a clinic exports them (see
`frame_files`): 16-bit PNGs with a labels CSV, or DICOM depth frames carrying PatientWeight and
PatientSize.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from domains.body_weight_height.body import Patient, Pose, fit_body
from domains.body_weight_height.clinic_profiles import PROFILES, ClinicProfile, PatientMix
from domains.body_weight_height.frame_files import frame_metadata, write_dicom_frame, write_labels_csv, write_png_frame
from domains.body_weight_height.scene import Placement, render_depth
from domains.case_record import make_case_record

FRAME_FORMATS = ("png", "dicom")
LABELS_FILE = "labels.csv"
FRAMES_FOLDER = "frames"


@dataclass(frozen=True)
class PhantomFrame:
    """One patient on one clinic's table and the frame its camera took (uint16 [rows, cols], mm)."""

    profile: ClinicProfile
    patient: Patient
    pose: Pose
    placement: Placement
    depth: np.ndarray

    @property
    def labels(self) -> dict[str, float]:
        return {"weight_kg": round(self.patient.weight_kg, 1), "height_cm": round(self.patient.height_cm, 1)}

    def metadata(self, file_format: str = "phantom") -> dict[str, Any]:
        return frame_metadata(self.profile.pixel_spacing_mm, file_format, self.profile.manufacturer,
                              self.profile.camera_model, self.profile.table_height_mm)

    def as_record(self, case_id: str) -> dict[str, Any]:
        """The frame as a case record, as ingestion would make it (image [1, rows, cols] in mm)."""
        along, across = self.profile.pixel_spacing_mm
        return make_case_record(case_id, self.depth[None].astype(np.float32), None, (1.0, along, across),
                                (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), self.metadata(), labels=self.labels)


def draw_patient(mix: PatientMix, rng: np.random.Generator) -> Patient:
    """An adult from `mix`: sex, height, BMI, and the body density and hidden share that make two
    patients of one weight and height look slightly different to the camera."""
    sex = "F" if rng.random() < mix.female_share else "M"
    mean, sd = mix.female_height_cm if sex == "F" else mix.male_height_cm
    height = float(np.clip(rng.normal(mean, sd), *mix.height_range_cm))
    bmi = float(np.clip(mix.bmi_median * np.exp(rng.normal(0.0, mix.bmi_spread)), *mix.bmi_range))
    return Patient(weight_kg=bmi * (height / 100.0) ** 2, height_cm=height, sex=sex,
                   density_kg_per_l=float(np.clip(rng.normal(1.01, 0.02), 0.95, 1.07)),
                   hidden_share=float(rng.uniform(0.02, 0.08)))


def draw_placement(profile: ClinicProfile, rng: np.random.Generator) -> tuple[Pose, Placement]:
    """How a patient of this clinic lies: arms, legs, position and rotation, cushions, blanket."""
    pose = Pose(arms_up=bool(rng.random() < profile.arms_up), ankle_spread_mm=float(rng.uniform(70.0, 170.0)))
    blanket = rng.random() < profile.blanket
    placement = Placement(
        head_mm=float(rng.uniform(*profile.head_position_mm)),
        lateral_mm=float(rng.normal(0.0, profile.lateral_sd_mm)),
        yaw_deg=float(rng.normal(0.0, profile.yaw_sd_deg)),
        feet_first=bool(rng.random() < profile.feet_first),
        knee_cushion=bool(rng.random() < profile.knee_cushion),
        blanket_from=float(rng.uniform(0.35, 0.6)) if blanket else None,
        blanket_mm=float(rng.uniform(*profile.blanket_mm)),
    )
    return pose, placement


def generate_frame(profile: ClinicProfile, rng: np.random.Generator) -> PhantomFrame:
    """A patient drawn from the clinic's mix, placed as the clinic places patients, seen by its camera."""
    patient = draw_patient(profile.patients, rng)
    pose, placement = draw_placement(profile, rng)
    return PhantomFrame(profile, patient, pose, placement, render_depth(profile, fit_body(patient, pose), placement, rng))


def clinic_profile(profile: str | ClinicProfile) -> ClinicProfile:
    """A profile given by name (one of `PROFILES`) or as itself."""
    if isinstance(profile, ClinicProfile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"unknown clinic profile {profile!r}; known: {sorted(PROFILES)}")
    return PROFILES[profile]


def phantom_fleet(profile: str | ClinicProfile, n_frames: int, seed: int) -> list[PhantomFrame]:
    """`n_frames` frames of one clinic; frame i depends only on (seed, i)."""
    profile = clinic_profile(profile)
    return [generate_frame(profile, np.random.default_rng(child)) for child in np.random.SeedSequence(seed).spawn(n_frames)]


def write_phantom_site(profile: str | ClinicProfile, out_dir: str | Path, n_frames: int, seed: int,
                       frame_format: str = "png", overwrite: bool = False) -> list[Path]:
    """A clinic's export: `out_dir/frames/<clinic>-0001.png ...` and `out_dir/labels.csv`
    (`frame_format` "png"), or `out_dir/frames/<clinic>-0001.dcm ...` whose headers carry the
    labels, each frame its own patient (`"dicom"`). Returns the frames' paths.

    An existing frames folder is refused unless `overwrite` (then it is replaced), because stale
    frames would silently join the export.
    """
    profile = clinic_profile(profile)
    if frame_format not in FRAME_FORMATS:
        raise ValueError(f"frame_format must be one of {FRAME_FORMATS}, got {frame_format!r}")
    out_dir = Path(out_dir)
    frames_dir = out_dir / FRAMES_FOLDER
    if frames_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{frames_dir} already exists; choose an empty out_dir or pass overwrite=True")
        shutil.rmtree(frames_dir)
        (out_dir / LABELS_FILE).unlink(missing_ok=True)
    paths, rows = [], []
    for index, frame in enumerate(phantom_fleet(profile, n_frames, seed)):
        name = f"{profile.name}-{index + 1:04d}"
        device = {"Manufacturer": profile.manufacturer, "ManufacturerModelName": profile.camera_model,
                  "TableHeight": profile.table_height_mm}
        if frame_format == "png":
            paths.append(write_png_frame(frames_dir / f"{name}.png", frame.depth, profile.pixel_spacing_mm, device))
            rows.append({"file": f"{name}.png", **frame.labels})
        else:
            patient = {"PatientName": f"PHANTOM^{name}", "PatientID": name, "PatientSex": frame.patient.sex,
                       "PatientWeight": frame.labels["weight_kg"], "PatientSize": frame.labels["height_cm"] / 100.0}
            paths.append(write_dicom_frame(frames_dir / f"{name}.dcm", frame.depth, profile.pixel_spacing_mm, patient,
                                           device, uid_seed=f"{seed}-{name}"))
    if rows:
        write_labels_csv(out_dir / LABELS_FILE, rows)
    return paths

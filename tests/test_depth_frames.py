"""Ingestion of depth frames: PNG + labels CSV and DICOM depth frames become de-identified cases,
every file and labels row is accounted for, bad input is named with what to do, and
`datasite-setup ingest --depth-frames` fills the case store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from datasite_setup import cli, upload
from datasite_setup.case_store import CaseSource, CaseStore
from datasite_setup.depth_frames import DepthFrameIngestion, LabelsFileError, read_depth_frames
from datasite_setup.site_config import load_site_config
from domains.body_weight_height import DOMAIN, PROFILES, model_input, phantom_fleet, write_phantom_site
from domains.body_weight_height.frame_files import write_dicom_frame, write_labels_csv, write_png_frame
from domains.case_manifest import mock_manifest
from tests.conftest import free_port, write_site_config

SECRET = b"depth-frames-test-secret-0123456789"
PROFILE = PROFILES["clinic-b"].with_size(96, 40)


def export(tmp_path: Path, n: int = 4, frame_format: str = "png", seed: int = 1) -> Path:
    write_phantom_site(PROFILE, tmp_path / "export", n, seed, frame_format=frame_format)
    return tmp_path / "export"


def fates(result) -> dict[str, tuple[str, str]]:
    """file name -> (outcome, reason) over the report; fails if a file has two fates."""
    seen: dict[str, tuple[str, str]] = {}
    for outcome in ("accepted", "rejected", "ignored"):
        for entry in getattr(result, outcome):
            for path in entry["files"]:
                assert Path(path).name not in seen, f"{path} listed twice"
                seen[Path(path).name] = (outcome, entry.get("reason", ""))
    return seen


def test_png_frames_and_their_labels_round_trip(tmp_path: Path) -> None:
    folder = export(tmp_path)
    result = read_depth_frames(folder / "frames", SECRET, folder / "labels.csv")
    assert result.summary() == {"files": 4, "accepted": 4, "rejected": 0, "ignored": 0, "cases": 4}
    truth = phantom_fleet(PROFILE, 4, 1)
    for record, entry, frame in zip(result.cases, result.accepted, truth):
        assert record["labels"] == frame.labels and entry["label_sources"]["weight_kg"].startswith("labels.csv line")
        assert np.array_equal(record["image"][0], np.asarray(Image.open(entry["path"])).astype(np.float32))
        assert np.array_equal(record["image"][0], frame.depth.astype(np.float32))
        assert record["spacing"][1:] == pytest.approx(list(PROFILE.pixel_spacing_mm), rel=1e-5)
        assert record["case_id"].startswith("case-") and "clinic-b" not in json.dumps(record["metadata"])
        assert record["metadata"]["ManufacturerModelName"] == PROFILE.camera_model
    again = read_depth_frames(folder / "frames", SECRET, folder / "labels.csv")
    other_site = read_depth_frames(folder / "frames", b"another-site-secret-0123456789", folder / "labels.csv")
    ids = [c["case_id"] for c in result.cases]
    assert ids == [c["case_id"] for c in again.cases] and not set(ids) & {c["case_id"] for c in other_site.cases}
    assert model_input(result.cases[0]).shape == (1, 128, 48)


def test_dicom_frames_carry_their_labels_and_leave_the_patient_behind(tmp_path: Path) -> None:
    folder = export(tmp_path, frame_format="dicom")
    ingestion = DepthFrameIngestion(folder, SECRET, progress=False)
    cases = list(ingestion.cases())
    assert ingestion.result.summary() == {"files": 4, "accepted": 4, "rejected": 0, "ignored": 0, "cases": 4}
    assert [c.record["labels"] for c in cases] == [f.labels for f in phantom_fleet(PROFILE, 4, 1)]
    assert len({c.patient for c in cases}) == 4  # each frame its own patient
    header = pydicom.dcmread(ingestion.files[0])
    assert header.Modality == "OT" and header.PhotometricInterpretation == "MONOCHROME2" and float(header.PatientSize) < 2.3
    text = json.dumps([c.record["metadata"] for c in cases])
    for identifying in (str(header.PatientName), str(header.PatientID), header.StudyInstanceUID, header.SeriesInstanceUID):
        assert identifying not in text
    assert cases[0].record["metadata"]["PixelSpacing"] == pytest.approx(list(PROFILE.pixel_spacing_mm), rel=1e-5)
    assert "PatientWeight" not in cases[0].record["metadata"]


def test_a_labels_file_completes_and_corrects_dicom_labels(tmp_path: Path) -> None:
    folder = export(tmp_path, n=2, frame_format="dicom")
    first, second = sorted((folder / "frames").glob("*.dcm"))
    ds = pydicom.dcmread(first)
    del ds.PatientSize
    ds.save_as(first)
    labels = write_labels_csv(tmp_path / "labels.csv", [{"file": first.name, "weight_kg": "", "height_cm": "181.5"},
                                                         {"file": f"./{second.name}", "weight_kg": "77", "height_cm": ""}])
    result = read_depth_frames(folder / "frames", SECRET, labels)
    assert result.summary()["accepted"] == 2
    completed, corrected = result.accepted
    assert completed["labels"]["height_cm"] == 181.5 and completed["label_sources"] == {
        "weight_kg": f"{first.name} PatientWeight (0010,1030)", "height_cm": "labels.csv line 2"}
    assert corrected["labels"]["weight_kg"] == 77.0 and corrected["label_sources"]["weight_kg"] == "labels.csv line 3"


def plain_png(path: Path, depth: np.ndarray, mode: str | None = None) -> Path:
    """A PNG without the depth-frame text chunks (as a generic tool writes one)."""
    image = Image.fromarray(depth) if mode is None else Image.fromarray(depth).convert(mode)
    image.save(path)
    return path


def test_bad_input_is_rejected_naming_the_file_the_field_and_what_to_do(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    depths = iter(frame.depth for frame in phantom_fleet(PROFILE, 8, 3))
    depth = next(depths)
    spacing = PROFILE.pixel_spacing_mm
    for name in ("good", "unlabelled", "heavy", "worded", "twice"):
        write_png_frame(frames / f"{name}.png", depth if name == "good" else next(depths), spacing)
    write_png_frame(frames / "zz_copy.png", depth, spacing)
    plain_png(frames / "eight_bit.png", (depth // 16).astype(np.uint8))
    plain_png(frames / "colour.png", (depth // 16).astype(np.uint8), "RGB")
    (frames / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    plain_png(frames / "no_spacing.png", next(depths))
    plain_png(frames / "spaced.png", next(depths))
    write_png_frame(frames / "empty.png", np.zeros_like(depth), spacing)
    (frames / "notes.txt").write_text("exported by the camera software\n")
    patient = {"PatientID": "P1", "PatientName": "DOE^JANE", "PatientSize": 1.7}
    write_dicom_frame(frames / "no_weight.dcm", depth, spacing, patient, {}, "a")
    write_dicom_frame(frames / "size_in_cm.dcm", depth, spacing, {"PatientID": "P2", "PatientWeight": 70, "PatientSize": 175}, {}, "b")
    write_dicom_frame(frames / "ct.dcm", depth, spacing, {"PatientID": "P3"}, {}, "c")
    ct = pydicom.dcmread(frames / "ct.dcm")
    ct.Modality, ct.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ct.save_as(frames / "ct.dcm")
    (frames / "garbage.dcm").write_bytes(b"\x00" * 300)
    labels = write_labels_csv(frames / "labels.csv", [
        {"file": "good.png", "weight_kg": 70, "height_cm": 170},
        {"file": "heavy.png", "weight_kg": 500, "height_cm": 170},
        {"file": "worded.png", "weight_kg": 70, "height_cm": "tall"},
        {"file": "twice.png", "weight_kg": 70, "height_cm": 170},
        {"file": "twice.png", "weight_kg": 71, "height_cm": 170},
        {"file": "eight_bit.png", "weight_kg": 70, "height_cm": 170},
        {"file": "colour.png", "weight_kg": 70, "height_cm": 170},
        {"file": "broken.png", "weight_kg": 70, "height_cm": 170},
        {"file": "no_spacing.png", "weight_kg": 70, "height_cm": 170},
        {"file": "spaced.png", "weight_kg": 70, "height_cm": 170, "pixel_spacing_mm": "12.5\\12.5"},
        {"file": "empty.png", "weight_kg": 70, "height_cm": 170},
        {"file": "missing.png", "weight_kg": 70, "height_cm": 170},
        {"file": "zz_copy.png", "weight_kg": 70, "height_cm": 170},
    ])
    result = read_depth_frames(frames, SECRET, labels)
    fate = fates(result)
    expected = {
        "good.png": ("accepted", ""),
        "spaced.png": ("accepted", ""),
        "unlabelled.png": ("rejected", "unlabelled.png: no labels row for this frame; add a row 'unlabelled.png,"),
        "heavy.png": ("rejected", "labels.csv line 3: weight_kg 500 is outside the plausible 2-350 kg"),
        "worded.png": ("rejected", "labels.csv line 4: height_cm 'tall' is not a number; write the height in cm"),
        "twice.png": ("rejected", "twice.png: listed in 2 rows of labels.csv (lines 5, 6); keep one row per frame"),
        "eight_bit.png": ("rejected", "eight_bit.png: a PNG of mode L (8-bit); a depth frame must be a 16-bit greyscale PNG"),
        "colour.png": ("rejected", "colour.png: a PNG of mode RGB (8-bit)"),
        "broken.png": ("rejected", "broken.png: not a readable PNG"),
        "no_spacing.png": ("rejected", "no_spacing.png: no pixel spacing: no PixelSpacing text chunk or pHYs chunk in the "
                                       "PNG and no pixel_spacing_mm in a labels row; add a pixel_spacing_mm column"),
        "zz_copy.png": ("rejected", "zz_copy.png: the same frame as good.png (same patient, study and series, or the same pixels)"),
        "empty.png": ("rejected", "empty.png: only 0% of its pixels hold a depth reading"),
        "no_weight.dcm": ("rejected", "no_weight.dcm: no PatientWeight (0010,1030) in the DICOM header and no labels row"),
        "size_in_cm.dcm": ("rejected", "size_in_cm.dcm PatientSize (0010,1020) is 175, i.e. 17500 cm: DICOM PatientSize is in metres"),
        "garbage.dcm": ("rejected", "garbage.dcm: not a DICOM file"),
        "ct.dcm": ("ignored", "a DICOM image of Modality CT, not a depth frame"),
        "notes.txt": ("ignored", "not a depth frame: neither a PNG nor a DICOM file"),
        "labels.csv": ("ignored", "the labels file (--labels)"),
    }
    assert set(fate) == set(expected) == {p.name for p in frames.iterdir()}
    for name, (outcome, reason) in expected.items():
        assert fate[name][0] == outcome and fate[name][1].startswith(reason), (name, fate[name])
    [orphan] = [e for e in result.rejected if not e["files"]]
    assert orphan["line"] == 13 and "labels.csv line 13: names frame 'missing.png', which is not a depth frame" in orphan["reason"]
    summary = result.summary()
    assert summary["files"] == summary["accepted"] + summary["rejected"] + summary["ignored"] == len(expected)
    assert summary["cases"] == 2 and "DOE" not in json.dumps([c["metadata"] for c in result.cases])
    assert [c["spacing"][1:] for c in result.cases if c["labels"]["weight_kg"] == 70][-1] == [12.5, 12.5]


def test_a_labels_file_without_its_columns_stops_before_any_case(tmp_path: Path) -> None:
    folder = export(tmp_path, n=1)
    bad = tmp_path / "labels.csv"
    bad.write_text("frame,weight\nclinic-b-0001.png,70\n")
    with pytest.raises(LabelsFileError, match=r"labels.csv: the labels file lacks the column\(s\) file, weight_kg, height_cm"):
        DepthFrameIngestion(folder / "frames", SECRET, bad)
    with pytest.raises(LabelsFileError, match="no such labels file"):
        DepthFrameIngestion(folder / "frames", SECRET, tmp_path / "absent.csv")


def test_cli_ingest_depth_frames_fills_the_case_store(tmp_path: Path, monkeypatch, capsys) -> None:
    """`datasite-setup ingest SITE.toml FRAMES --depth-frames --labels CSV --json` as far as the case
    store; publishing (a live datasite) is replaced by rendering the mock and marking the version."""
    folder = export(tmp_path, n=5)
    (folder / "frames" / "stray.png").write_bytes(b"not a png")
    config_path = write_site_config(tmp_path / "site", "clinic-b", free_port())
    published: list[list[dict]] = []

    def publish(config, store, version, name, domain) -> None:
        mock = mock_manifest([e.to_dict() for e in store.manifest(version, collection=name)])
        published.append(__import__("domains").get_domain(domain).mock_cases(mock))
        store.mark_published(version, name)

    monkeypatch.setattr(upload, "publish", publish)
    argv = ["ingest", str(config_path), str(folder / "frames"), "--depth-frames", "--labels", str(folder / "labels.csv"), "--json"]
    code = cli.main(argv)
    report = json.loads(capsys.readouterr().out)
    assert code == cli.EXIT_REJECTED and report["added"] == 5 and report["summary"]["rejected"] == 1
    assert report["dataset"] == "clinic-b-cases" and report["manifest_version"] and report["label_rows"] == 5
    [mocks] = published
    assert len(mocks) == 5 and all(m["case_id"].startswith("mock-") and set(m["labels"]) == {"weight_kg", "height_cm"} for m in mocks)

    store = CaseStore(load_site_config(config_path).data_dir)
    entries = store.manifest(collection="clinic-b-cases")
    assert len(entries) == 5 and not any(e.has_mask for e in entries)
    stored = CaseSource(store.root, entries)[0]
    assert set(stored["labels"]) == {"weight_kg", "height_cm"} and stored["image"].shape == (1, 96, 40)
    counts = DOMAIN.evaluation_counts(DOMAIN.build_model(), CaseSource(store.root, entries))
    assert counts["n_cases"] == 5

    assert cli.main(argv) == cli.EXIT_REJECTED and json.loads(capsys.readouterr().out)["added"] == 0  # nothing new


def test_cli_refuses_depth_frames_with_dicom_options_and_labels_without_depth_frames(tmp_path: Path, capsys) -> None:
    folder = export(tmp_path, n=1)
    config_path = write_site_config(tmp_path / "site", "clinic-b", free_port())
    code = cli.main(["ingest", str(config_path), str(folder / "frames"), "--depth-frames", "--masks", str(tmp_path)])
    assert code == cli.EXIT_ERROR and "--masks apply to DICOM series with masks, not to --depth-frames" in capsys.readouterr().err
    code = cli.main(["ingest", str(config_path), str(folder / "frames"), "--labels", str(folder / "labels.csv")])
    assert code == cli.EXIT_ERROR and "add --depth-frames" in capsys.readouterr().err

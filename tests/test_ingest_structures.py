"""Masks of several structures (liver 1, lesion 2) through ingestion: RTSTRUCT ROIs, DICOM SEG
segments and label-map files become one label map, the report says which structures each case
has, and the manifest names the labels. Binary masks stay as they were (the existing ingestion
tests cover them unchanged)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from datasite_setup import cli, upload
from datasite_setup.case_store import CaseSource, CaseStore, CaseStoreError, ManifestEntry, content_hash
from datasite_setup.dicom_series import scan_folder
from datasite_setup.ingest import Ingestion, read_cases
from datasite_setup.rtstruct import RTStructError, rasterize_roi, rasterize_structures
from domains.case_manifest import mock_manifest
from domains.case_record import make_case_record
from tests.conftest import free_port, shared_data_dir, write_site_config
from tests.test_ingest_accounting import assert_each_file_once
from tests.test_ingest_bad_input import N_SLICES, SECRET, SEG_SOP_CLASS, STEP, write_mask, write_stack
from tests.test_rtstruct import box, grid_series, structure_set, voxel_polygon

STRUCTURES = ("liver", "lesion")
SHAPE = (N_SLICES, 64, 64)


def liver_and_lesion() -> tuple[np.ndarray, np.ndarray]:
    """A liver on slices 1-3 and a lesion inside it on slices 2-3, as boolean volumes."""
    liver, lesion = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    liver[1:4, 10:50, 12:52] = True
    lesion[2, 20:30, 22:34] = True
    lesion[3, 40:45, 40:48] = True
    return liver, lesion


def label_map(liver: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[liver], labels[lesion] = 1, 2
    return labels


# --- DICOM SEG -----------------------------------------------------------------------------------------

def write_structures_seg(path: Path, series_folder: Path, segments: list[tuple[int, str, np.ndarray]],
                         identify_frames: bool = True) -> None:
    """A BINARY SEG with one frame per (segment, slice it covers), in the order given: each frame's
    segment in its SegmentIdentificationSequence and its slice in its PlanePositionSequence."""
    slices = sorted(series_folder.glob("slice*.dcm"))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in slices]
    frames, per_frame = [], []
    for number, _, volume in segments:
        for k in np.flatnonzero(volume.reshape(len(volume), -1).any(axis=1)):
            frames.append(volume[k].astype(np.uint8))
            position = Dataset()
            position.ImagePositionPatient = headers[k].ImagePositionPatient
            group = Dataset()
            group.PlanePositionSequence = Sequence([position])
            if identify_frames:
                identification = Dataset()
                identification.ReferencedSegmentNumber = number
                group.SegmentIdentificationSequence = Sequence([identification])
            per_frame.append(group)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SEG_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SEG"
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = headers[0].FrameOfReferenceUID
    referenced = Dataset()
    referenced.SeriesInstanceUID = headers[0].SeriesInstanceUID
    ds.ReferencedSeriesSequence = Sequence([referenced])
    ds.SegmentationType = "BINARY"
    items = []
    for number, label, _ in segments:
        item = Dataset()
        item.SegmentNumber = number
        item.SegmentLabel = label
        items.append(item)
    ds.SegmentSequence = Sequence(items)
    ds.Rows, ds.Columns, ds.NumberOfFrames = SHAPE[1], SHAPE[2], len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    plane = Dataset()
    plane.ImageOrientationPatient = headers[0].ImageOrientationPatient
    measures = Dataset()
    measures.PixelSpacing = headers[0].PixelSpacing
    measures.SliceThickness = STEP
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([plane])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = pack_bits(np.stack(frames).ravel())
    ds.save_as(path, enforce_file_format=True)


def seg_tree(tmp_path: Path, segments: list[tuple[int, str, np.ndarray]], **kwargs: bool) -> Path:
    dicom = tmp_path / "dicom"
    write_stack(dicom / "p1")
    write_structures_seg(dicom / "seg.dcm", dicom / "p1", segments, **kwargs)
    return dicom


def test_seg_segments_become_labels_by_name_and_unnamed_segments_are_listed(tmp_path: Path) -> None:
    liver, lesion = liver_and_lesion()
    vessels = np.zeros(SHAPE, bool)
    vessels[1, 0:5, 0:5] = True
    # Segment numbers in another order than the structures, labels in other cases, lesion frames first.
    dicom = seg_tree(tmp_path, [(1, "Lesion", lesion), (2, "LIVER", liver), (3, "vessels", vessels)])

    result = read_cases(dicom, None, SECRET, progress=False, structures=STRUCTURES)

    assert result.rejected == [] and result.ignored == []
    [record] = result.cases
    assert record["mask"].dtype == np.uint8 and np.array_equal(record["mask"], label_map(liver, lesion))
    [accepted] = result.accepted
    assert accepted["structure_voxels"] == {"liver": int((liver & ~lesion).sum()), "lesion": int(lesion.sum())}
    assert accepted["not_in_structures"] == ["segment 3 'vessels'"]
    assert accepted["mask_voxels"] == int(liver.sum())
    assert_each_file_once(json.loads(json.dumps(result.to_report())), dicom)

    binary = read_cases(dicom, None, SECRET, progress=False)  # without --structures: as before
    assert "seg.dcm: DICOM SEG with 3 segments is not supported" in binary.rejected[0]["reason"]


def test_seg_without_lesion_is_a_case_and_without_any_structure_is_rejected(tmp_path: Path) -> None:
    liver, _ = liver_and_lesion()
    only_liver = read_cases(seg_tree(tmp_path / "a", [(1, "Liver", liver)]), None, SECRET, progress=False,
                            structures=STRUCTURES)
    assert only_liver.rejected == [] and np.array_equal(only_liver.cases[0]["mask"], liver.astype(np.uint8))
    assert only_liver.accepted[0]["structure_voxels"] == {"liver": int(liver.sum()), "lesion": 0}

    dicom = seg_tree(tmp_path / "b", [(1, "Spleen", liver), (2, "Kidney", liver)])
    result = read_cases(dicom, None, SECRET, progress=False, structures=STRUCTURES)
    assert result.cases == []
    [rejection] = result.rejected
    assert (f"{dicom / 'seg.dcm'}: none of the structures 'liver', 'lesion' is a segment of this SEG (its "
            "segments by SegmentLabel (0062,0005): 1 'Spleen', 2 'Kidney')") in rejection["reason"]
    assert len(rejection["files"]) == N_SLICES + 1


def test_seg_frames_need_their_segment_and_fractional_segs_are_refused(tmp_path: Path) -> None:
    liver, lesion = liver_and_lesion()
    dicom = seg_tree(tmp_path / "a", [(1, "liver", liver), (2, "lesion", lesion)], identify_frames=False)
    [rejection] = read_cases(dicom, None, SECRET, progress=False, structures=STRUCTURES).rejected
    assert ("seg.dcm: frame 1 has no SegmentIdentificationSequence (0062,000A) > ReferencedSegmentNumber "
            "(0062,000B)") in rejection["reason"]

    one_segment = seg_tree(tmp_path / "b", [(1, "liver", liver)], identify_frames=False)
    result = read_cases(one_segment, None, SECRET, progress=False, structures=STRUCTURES)
    assert result.rejected == [] and np.array_equal(result.cases[0]["mask"], liver.astype(np.uint8))

    fractional = seg_tree(tmp_path / "c", [(1, "liver", liver), (2, "lesion", lesion)])
    ds = pydicom.dcmread(fractional / "seg.dcm")
    ds.SegmentationType = "FRACTIONAL"
    ds.save_as(fractional / "seg.dcm")
    [rejection] = read_cases(fractional, None, SECRET, progress=False, structures=STRUCTURES).rejected
    assert ("seg.dcm: SegmentationType (0062,0001) FRACTIONAL is not supported; only BINARY SEGs are"
            in rejection["reason"])


# --- Label-map files -----------------------------------------------------------------------------------

def test_label_map_file_is_taken_as_it_is_when_its_values_name_structures(tmp_path: Path) -> None:
    dicom, masks = tmp_path / "dicom", tmp_path / "masks"
    write_stack(dicom / "good")
    write_stack(dicom / "extra")
    write_stack(dicom / "binary")
    liver, lesion = liver_and_lesion()
    expected = write_mask(masks / "good.nii.gz", values=label_map(liver, lesion))
    three = label_map(liver, lesion)
    three[1, 0:3, 0:3] = 3
    write_mask(masks / "extra.nii.gz", values=three)
    write_mask(masks / "binary.nii.gz")

    result = read_cases(dicom, masks, SECRET, progress=False, structures=STRUCTURES)

    by_folder = {Path(a["folder"]).name: (a, c) for a, c in zip(result.accepted, result.cases)}
    assert sorted(by_folder) == ["binary", "good"]
    assert np.array_equal(by_folder["good"][1]["mask"], expected) and by_folder["good"][1]["mask"].dtype == np.uint8
    assert by_folder["good"][0]["not_in_structures"] == []
    assert by_folder["binary"][0]["structure_voxels"]["lesion"] == 0  # 0/1: liver only
    [rejection] = result.rejected
    assert (f"{masks / 'extra.nii.gz'}: label map with values 0, 1, 2, 3, but --structures gives 2 structure(s) "
            "(0 background, 1 liver, 2 lesion), so 3 names no structure") in rejection["reason"]


# --- RTSTRUCT: synthetic structure sets -----------------------------------------------------------------

def test_rtstruct_rois_are_painted_in_structure_order_whatever_their_order_in_the_file() -> None:
    series = grid_series()
    liver = [voxel_polygon(series, k, box(0.5, 7.5, 0.5, 6.5)) for k in (1, 2, 3)]
    lesion = [voxel_polygon(series, 2, box(2.5, 4.5, 2.5, 4.5))]
    body = [voxel_polygon(series, 2, box(0.5, 8.5, 0.5, 6.5))]
    rtstruct = structure_set({"GTV lesion": [], "Lesion": lesion, "Body": body, "LIVER": liver})

    labels = rasterize_structures(rtstruct, series, STRUCTURES)

    expected = rasterize_roi(rtstruct, series, "LIVER")
    expected[rasterize_roi(rtstruct, series, "Lesion").astype(bool)] = 2
    assert labels.values.dtype == np.uint8 and np.array_equal(labels.values, expected)
    assert set(np.unique(labels.values)) == {0, 1, 2} and (labels.values[2, 3:5, 3:5] == 2).all()
    assert labels.other == ("ROI 'GTV lesion'", "ROI 'Body'")
    reversed_order = rasterize_structures(rtstruct, series, ("lesion", "liver")).values
    assert (reversed_order[2, 3:5, 3:5] == 2).all() and (reversed_order == 1).sum() == 0  # liver painted over


def test_rtstruct_missing_roi_is_an_empty_structure_and_none_is_an_error() -> None:
    series = grid_series()
    liver = [voxel_polygon(series, 1, box(0.5, 3.5, 0.5, 3.5))]
    labels = rasterize_structures(structure_set({"Liver": liver}), series, STRUCTURES).values
    assert np.array_equal(labels, rasterize_roi(structure_set({"Liver": liver}), series))

    with pytest.raises(RTStructError, match=r"RS\.dcm: none of the structures 'liver', 'lesion' is an ROI of this "
                                            r"structure set \(StructureSetROISequence \(3006,0020\) ROIName: "
                                            r"'GTV', 'Body'\)"):
        rasterize_structures(structure_set({"GTV": liver, "Body": liver}), series, STRUCTURES, source="RS.dcm")
    with pytest.raises(RTStructError, match=r"several ROIs are named 'liver' \('Liver ', 'LIVER'\)"):
        rasterize_structures(structure_set({"Liver ": liver, "LIVER": liver}), series, STRUCTURES)


# --- RTSTRUCT: a real CT study with a real tumour contour -------------------------------------------------

REAL_CASE = "STS_002"


def real_ct_case() -> Path:
    case = shared_data_dir() / "ibsi_sts_ct" / "dicom" / REAL_CASE
    if not (case / "image").is_dir() or not (case / "mask" / "RS.dcm").is_file():
        pytest.skip(f"real CT data not found at {case} (set MEDFED_TEST_DATA to the folder holding ibsi_sts_ct)")
    return case


def with_liver_around_the_tumour(rtstruct: Dataset, margin_mm: float = 8.0) -> Dataset:
    """The real structure set with its GTV renamed 'Lesion' and a 'Liver' ROI added: on every slice
    of the GTV and one slice beyond each end, a rectangle `margin_mm` around the whole GTV."""
    ds = copy.deepcopy(rtstruct)
    ds.StructureSetROISequence[0].ROIName = "Lesion"
    gtv = ds.ROIContourSequence[0].ContourSequence
    points = np.concatenate([np.array(c.ContourData, float).reshape(-1, 3) for c in gtv])
    (x0, y0), (x1, y1) = points[:, :2].min(axis=0) - margin_mm, points[:, :2].max(axis=0) + margin_mm
    levels = sorted({float(c.ContourData[2]) for c in gtv})
    step = levels[1] - levels[0]
    roi = copy.deepcopy(ds.StructureSetROISequence[0])
    roi.ROINumber, roi.ROIName = 2, "Liver"
    ds.StructureSetROISequence.append(roi)
    item = copy.deepcopy(ds.ROIContourSequence[0])
    item.ReferencedROINumber = 2
    contours = []
    for z in [levels[0] - step, *levels, levels[-1] + step]:
        contour = copy.deepcopy(gtv[0])
        corners = np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]])
        contour.ContourData = [f"{v:.3f}" for v in corners.ravel()]
        contour.NumberOfContourPoints = 4
        contours.append(contour)
    item.ContourSequence = Sequence(contours)
    ds.ROIContourSequence.append(item)
    return ds


def real_tree(root: Path, rtstructs: dict[str, Dataset]) -> Path:
    """A copy of the real CT series beside the given structure sets."""
    (root / REAL_CASE).mkdir(parents=True)
    shutil.copytree(real_ct_case() / "image", root / REAL_CASE / "image")
    (root / REAL_CASE / "mask").mkdir()
    for name, ds in rtstructs.items():
        ds.save_as(root / REAL_CASE / "mask" / name)
    return root


def test_real_ct_with_liver_and_lesion_rois(tmp_path: Path) -> None:
    original = pydicom.dcmread(real_ct_case() / "mask" / "RS.dcm")
    two_rois = with_liver_around_the_tumour(original)
    tree = real_tree(tmp_path / "both", {"RS.dcm": two_rois})

    result = read_cases(tree, None, SECRET, progress=False, structures=STRUCTURES)

    assert result.rejected == [] and result.ignored == []
    [record], [accepted] = result.cases, result.accepted
    [series] = scan_folder(tree, progress=False).series
    liver = rasterize_roi(two_rois, series, "Liver").astype(bool)
    lesion = rasterize_roi(two_rois, series, "Lesion").astype(bool)
    assert lesion.sum() > 1000 and (lesion & ~liver).sum() == 0  # the tumour lies inside the "liver"
    mask = record["mask"]
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1, 2}
    assert np.array_equal(mask == 2, lesion) and np.array_equal(mask == 1, liver & ~lesion)
    assert accepted["structure_voxels"] == {"liver": int((liver & ~lesion).sum()), "lesion": int(lesion.sum())}
    assert accepted["mask"] == str(tree / REAL_CASE / "mask" / "RS.dcm")
    assert_each_file_once(result.to_report(), tree)


def test_real_ct_lesion_free_liver_no_named_roi_and_a_second_structure_set(tmp_path: Path) -> None:
    original = pydicom.dcmread(real_ct_case() / "mask" / "RS.dcm")
    two_rois = with_liver_around_the_tumour(original)

    liver_only = copy.deepcopy(two_rois)
    del liver_only.StructureSetROISequence[0]
    del liver_only.ROIContourSequence[0]
    result = read_cases(real_tree(tmp_path / "liver-only", {"RS.dcm": liver_only}), None, SECRET, progress=False,
                        structures=STRUCTURES)
    assert result.rejected == [] and set(np.unique(result.cases[0]["mask"])) == {0, 1}
    assert result.accepted[0]["structure_voxels"]["lesion"] == 0

    tree = real_tree(tmp_path / "gtv-only", {"RS.dcm": original})
    result = read_cases(tree, None, SECRET, progress=False, structures=STRUCTURES)
    assert result.cases == []
    [rejection] = result.rejected
    assert (f"{tree / REAL_CASE / 'mask' / 'RS.dcm'}: none of the structures 'liver', 'lesion' is an ROI of this "
            "structure set (StructureSetROISequence (3006,0020) ROIName: 'GTV_Mass_CT')") in rejection["reason"]
    assert_each_file_once(result.to_report(), tree)
    binary = read_cases(tree, None, SECRET, progress=False)  # without --structures: as before
    assert len(binary.cases) == 1 and set(np.unique(binary.cases[0]["mask"])) == {0, 1}
    assert not {"structure_voxels", "not_in_structures"} & set(binary.accepted[0])

    tree = real_tree(tmp_path / "two-sets", {"RS.dcm": two_rois, "RS_other.dcm": original})
    result = read_cases(tree, None, SECRET, progress=False, structures=STRUCTURES)
    assert result.rejected == [] and result.accepted[0]["mask"] == str(tree / REAL_CASE / "mask" / "RS.dcm")
    [ignored] = result.ignored
    assert ignored["path"].endswith("RS_other.dcm") and ignored["reason"].startswith("RTSTRUCT not used")


# --- Options, manifest, case store ----------------------------------------------------------------------

def test_roi_and_structures_exclude_each_other_and_names_are_checked(tmp_path: Path) -> None:
    write_stack(tmp_path / "dicom" / "p1")
    with pytest.raises(ValueError, match="--roi 'GTV' and --structures liver,lesion exclude each other"):
        Ingestion(tmp_path / "dicom", None, SECRET, roi="GTV", structures=STRUCTURES, progress=False)
    with pytest.raises(ValueError, match="names 'Liver', 'liver' more than once"):
        Ingestion(tmp_path / "dicom", None, SECRET, structures=("liver", "Liver"), progress=False)

    parser = cli.build_parser()
    args = parser.parse_args(["ingest", "site.toml", "dicom", "--structures", " liver, lesion"])
    assert args.structures == STRUCTURES and args.roi is None
    assert parser.parse_args(["ingest", "site.toml", "dicom"]).structures is None
    for bad in (["--roi", "GTV", "--structures", "liver,lesion"], ["--structures", "liver,,lesion"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["ingest", "site.toml", "dicom", *bad])
        assert exit_.value.code == 2


def test_manifest_entry_mask_labels_round_trip_mock_and_content_hash(tmp_path: Path) -> None:
    liver, lesion = liver_and_lesion()
    image = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    record = make_case_record("case-a", image, label_map(liver, lesion), (2.5, 1.0, 1.0), (0.0, 0.0, 0.0),
                              (1, 0, 0, 0, 1, 0, 0, 0, 1), {"Manufacturer": "ACME"})
    store = CaseStore(tmp_path)
    version = store.new_version()
    entry = store.put(record, "p1", "train", version=version, mask_labels=STRUCTURES)
    assert entry is not None and entry.mask_labels == STRUCTURES
    assert entry.content_hash == content_hash(record, STRUCTURES) != content_hash(record)
    assert store.put(record, "p1", "train", version=version, mask_labels=STRUCTURES) is None  # re-ingested: no-op
    with pytest.raises(CaseStoreError, match="already stored with other content"):
        store.put(record, "p1", "train", version=version, mask_labels=("liver", "tumour"))
    with pytest.raises(CaseStoreError, match="label value 2, but only 1 label name"):
        store.put({**record, "case_id": "case-b"}, "p2", "train", version=version, mask_labels=("liver",))

    [stored] = store.manifest()
    as_dict = json.loads(json.dumps(stored.to_dict()))
    assert as_dict["mask_labels"] == list(STRUCTURES) and ManifestEntry.from_dict(as_dict) == stored
    old = {key: value for key, value in as_dict.items() if key != "mask_labels"}
    assert ManifestEntry.from_dict(old).mask_labels == ()  # entries written before label maps still load
    [mock] = mock_manifest([as_dict])
    assert mock["mask_labels"] == list(STRUCTURES) and mock["content_hash"] == ""

    [case] = CaseSource(store.root, [stored])
    assert set(case) == {"case_id", "image", "spacing", "origin", "direction", "metadata", "split", "mask"}
    assert np.array_equal(case["mask"], record["mask"]) and case["mask"].dtype == np.uint8


def test_cli_ingest_with_structures_stores_label_maps_and_reports_them(tmp_path: Path, monkeypatch, capsys) -> None:
    """`datasite-setup ingest --structures liver,lesion --json` as far as the case store; publishing
    (a live datasite) is replaced by marking the version published."""
    liver, lesion = liver_and_lesion()
    dicom = seg_tree(tmp_path, [(1, "liver", liver), (2, "lesion", lesion)])
    config_path = write_site_config(tmp_path / "site", "hospital-liver", free_port())
    published: list[list[dict]] = []

    def publish(config, store, version, name, domain) -> None:
        published.append(mock_manifest([e.to_dict() for e in store.manifest(version, collection=name)]))
        store.mark_published(version, name)

    monkeypatch.setattr(upload, "publish", publish)
    code = cli.main(["ingest", str(config_path), str(dicom), "--structures", "liver,lesion", "--json"])
    report = json.loads(capsys.readouterr().out)

    assert code == cli.EXIT_OK and report["mask_labels"] == list(STRUCTURES) and report["added"] == 1
    assert report["accepted"][0]["structure_voxels"] == {"liver": int((liver & ~lesion).sum()),
                                                         "lesion": int(lesion.sum())}
    [[mock]] = published
    assert mock["mask_labels"] == list(STRUCTURES)
    from datasite_setup.site_config import load_site_config

    store = CaseStore(load_site_config(config_path).data_dir)
    [entry] = store.manifest(collection="hospital-liver-cases")
    assert entry.mask_labels == STRUCTURES
    assert np.array_equal(CaseSource(store.root, [entry])[0]["mask"], label_map(liver, lesion))


# --- The liver CT phantom's exports ---------------------------------------------------------------------

def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("mask_format", ["seg", "rtstruct", "nifti"])
def test_phantom_liver_site_ingests_as_its_label_maps(tmp_path: Path, mask_format: str) -> None:
    phantom = pytest.importorskip("domains.liver_ct_segmentation.phantom")
    phantom_dicom = pytest.importorskip("domains.liver_ct_segmentation.phantom_dicom")
    size = {"matrix": 48, "z_extent_mm": 90.0}
    ids = phantom_dicom.write_phantom_site(tmp_path, "hospital-b", 2, seed=5, mask_format=mask_format, **size)
    truth = phantom.phantom_fleet({"hospital-b": 2}, seed=5, **size)["hospital-b"]
    masks = tmp_path / "masks" if mask_format == "nifti" else None

    result = read_cases(tmp_path / "dicom", masks, SECRET, progress=False, structures=STRUCTURES)

    assert result.rejected == [] and result.ignored == [] and len(result.cases) == 2
    assert sum(int((case["mask"] == 2).sum()) for case in truth) > 0  # the seed gives lesions to check
    for accepted, record in zip(result.accepted, result.cases):
        expected = truth[ids.index(Path(accepted["folder"]).parent.name)]["mask"]
        got = record["mask"]
        assert got.dtype == np.uint8 and got.shape == expected.shape
        if mask_format == "rtstruct":  # contours drawn from the label map and filled again
            assert dice(got >= 1, expected >= 1) >= 0.95
            assert (expected == 2).any() == (got == 2).any()
            if (expected == 2).any():
                assert dice(got == 2, expected == 2) >= 0.9
        else:
            assert np.array_equal(got, expected)
        assert accepted["structure_voxels"] == {"liver": int((got == 1).sum()), "lesion": int((got == 2).sum())}

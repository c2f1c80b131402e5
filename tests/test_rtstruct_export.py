"""The shared RTSTRUCT writer against ingestion's reader: label masks written as contours must
rasterise back to the same voxels, holes and islands included, on an oblique grid whose files
come in any order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from datasite_setup.dicom_series import DicomSeries, Geometry
from datasite_setup.rtstruct import rasterize_structures, read_rtstruct, referenced_series_uids
from domains.rtstruct_export import Structure, write_structure_set

SHAPE = (4, 24, 20)
SPACING = (2.5, 1.5, 1.25)  # z, y, x mm
ORIGIN = (-10.0, 5.0, 30.0)
DIRECTION = (0.6, -0.8, 0.0, 0.8, 0.6, 0.0, 0.0, 0.0, 1.0)  # rotated 53 degrees about z
SERIES_UID, FRAME_UID = "1.2.3.10", "1.2.3.11"


def slice_headers() -> list[Dataset]:
    """One header per slice of the grid, as an image series' files state it."""
    direction = np.array(DIRECTION).reshape(3, 3)
    headers = []
    for k in range(SHAPE[0]):
        header = Dataset()
        header.SOPClassUID = CTImageStorage
        header.SOPInstanceUID = f"1.2.3.20.{k}"
        header.SeriesInstanceUID = SERIES_UID
        header.StudyInstanceUID = "1.2.3.12"
        header.FrameOfReferenceUID = FRAME_UID
        header.StudyDate = "20240101"
        header.PatientID = "P-1"
        header.ImagePositionPatient = list(np.array(ORIGIN) + k * SPACING[0] * direction[:, 2])
        header.ImageOrientationPatient = [*direction[:, 0], *direction[:, 1]]
        header.PixelSpacing = [SPACING[1], SPACING[2]]
        headers.append(header)
    return headers


def test_label_map_with_a_hole_and_two_islands_rasterises_back(tmp_path: Path) -> None:
    rows, cols = np.mgrid[:SHAPE[1], :SHAPE[2]]
    labels = np.zeros(SHAPE, np.uint8)
    ring = (rows - 10) ** 2 + (cols - 9) ** 2
    labels[1][(ring <= 49) & (ring > 9)] = 1  # an organ with a hole
    labels[1][(rows - 20) ** 2 + (cols - 16) ** 2 <= 4] = 1  # a second island of it
    labels[1][ring <= 1] = 2  # a lesion inside the hole
    labels[2][:4, :5] = 1  # touching the image corner
    headers = slice_headers()

    organ = Structure("organ", labels >= 1, (221, 130, 101), "ORGAN")
    lesion = Structure("lesion", labels == 2, (255, 255, 0), "GTV")
    absent = Structure("metastasis", np.zeros(SHAPE, bool), (0, 0, 255), "GTV")
    path = write_structure_set(headers[::-1], [organ, lesion, absent], tmp_path / "RS.dcm", label="TEST",
                               description="Round trip", series_number=7)

    rtstruct = read_rtstruct(path)
    assert referenced_series_uids(rtstruct) == [SERIES_UID]
    assert [roi.ROIName for roi in rtstruct.StructureSetROISequence] == ["organ", "lesion", "metastasis"]
    organ_contours = rtstruct.ROIContourSequence[0].ContourSequence
    assert [c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in organ_contours] == ["1.2.3.20.1"] * 4 + ["1.2.3.20.2"]
    assert "ContourSequence" not in rtstruct.ROIContourSequence[2]

    header = Dataset()
    header.FrameOfReferenceUID = FRAME_UID
    series = DicomSeries(SERIES_UID, np.zeros(SHAPE, np.float32), Geometry(SHAPE, SPACING, ORIGIN, DIRECTION),
                         [tmp_path / "image.dcm"], header)
    rasterised = rasterize_structures(rtstruct, series, ("organ", "lesion", "metastasis"))
    np.testing.assert_array_equal(rasterised.values, labels)

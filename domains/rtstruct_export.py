"""Label masks on a DICOM image series, written as an RT Structure Set the way planning systems export them.

The phantoms of several domains file their ground truth as RTSTRUCT so that ingestion meets it as it
meets real exports: one ROI per structure, CLOSED_PLANAR contours in patient millimetres on the
slices they outline, each contour and the structure set referencing the series' SOP instances.
Holes and separate islands of a slice are separate contours, so even-odd filling (the rule
`datasite_setup.rtstruct` rasterises by) gives the mask back. A structure with no voxels keeps its
ROI with no contours, as a lesion-free case is written by planning systems.

Contours are placed by each slice header's ImagePositionPatient, ImageOrientationPatient and
PixelSpacing, so they lie in the planes of the images they reference whatever grid the mask was
drawn on. UIDs derive from the image series' UID: writing the same series again gives the same file.

The attributes a derived object shares with its images (patient, study, file meta, image
references) are here too, for the other derived objects the phantoms write (DICOM SEG).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid
from skimage.measure import find_contours

STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"

_PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID",
                      "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "StudyID",
                      "InstitutionName")


@dataclass(frozen=True)
class Structure:
    """One ROI: `mask` is binary [Z, Y, X] on the series' grid, slice k the k-th along the slice
    normal; `interpreted_type` is its RT ROI Interpreted Type (ORGAN, GTV, ...)."""

    name: str
    mask: np.ndarray
    colour: tuple[int, int, int]
    interpreted_type: str


def file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    """File meta of a phantom file: explicit little endian, naming the phantom as its writer."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MEDFED_PHANTOM"
    return meta


def image_reference(header: Dataset) -> Dataset:
    """An item referencing one image by SOP class and instance, as derived objects cite their sources."""
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    return item


def derived_object(sop_class: str, sop_instance: str, source: Dataset) -> Dataset:
    """A new derived object (SEG, RTSTRUCT) of `sop_class` on the images of `source`: its file meta
    and SOP identity, and the patient and study attributes it shares with its images, so archives
    file it into the same patient and study (absent ones become empty)."""
    ds = Dataset()
    ds.file_meta = file_meta(sop_class, sop_instance)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    for keyword in _PATIENT_AND_STUDY:
        setattr(ds, keyword, source.get(keyword, ""))
    return ds


def _slice_order(headers: Sequence[Dataset]) -> list[Dataset]:
    """The headers along the slice normal, the order of a [Z, Y, X] mask's slices: files of an
    export are named at random, so only ImagePositionPatient says which slice is which."""
    orientation = np.array(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(headers, key=lambda header: float(np.dot(np.array(header.ImagePositionPatient, dtype=float), normal)))


def _contours_mm(mask_slice: np.ndarray, header: Dataset) -> list[np.ndarray]:
    """Closed outlines of one binary slice as [N, 3] patient coordinates: outer boundaries and
    holes alike, so even-odd filling gives the slice back. The zero border closes blobs touching
    the image edge; the repeated last point is dropped because CLOSED_PLANAR closes implicitly."""
    position = np.array(header.ImagePositionPatient, dtype=float)
    orientation = np.array(header.ImageOrientationPatient, dtype=float)
    spacing_y, spacing_x = (float(v) for v in header.PixelSpacing)
    outlines = []
    for contour in find_contours(np.pad(mask_slice.astype(float), 1), 0.5):
        rows, cols = contour[:-1, 0] - 1, contour[:-1, 1] - 1
        outlines.append(position + np.outer(cols * spacing_x, orientation[:3]) + np.outer(rows * spacing_y, orientation[3:]))
    return outlines


def _roi_contour(number: int, structure: Structure, headers: Sequence[Dataset]) -> Dataset:
    contours = []
    for k, header in enumerate(headers):
        if not structure.mask[k].any():
            continue
        for points in _contours_mm(structure.mask[k], header):
            contour = Dataset()
            contour.ContourImageSequence = DicomSequence([image_reference(header)])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [round(float(v), 3) for v in points.ravel()]
            contours.append(contour)
    roi_contour = Dataset()
    roi_contour.ROIDisplayColor = list(structure.colour)
    roi_contour.ReferencedROINumber = number
    if contours:
        roi_contour.ContourSequence = DicomSequence(contours)
    return roi_contour


def write_structure_set(headers: Sequence[Dataset], structures: Sequence[Structure], path: str | Path, *, label: str,
                        description: str, series_number: int) -> Path:
    """Write `structures` on the series of `headers` (one per slice, any order) as an RT Structure
    Set to `path`: ROI i + 1 is `structures[i]`. `label` is the StructureSetLabel, `description`
    and `series_number` name the structure set's own series."""
    if not headers:
        raise ValueError("headers: a structure set needs the image slices it is drawn on")
    for structure in structures:
        if structure.mask.shape[0] != len(headers):
            raise ValueError(f"structure {structure.name!r}: the series has {len(headers)} slices but the mask "
                             f"has {structure.mask.shape[0]}")
    ordered = _slice_order(headers)
    first = ordered[0]
    series_uid = str(first.SeriesInstanceUID)
    sop_uid = generate_uid(entropy_srcs=[series_uid, "rtstruct-sop"])

    ds = derived_object(RTStructureSetStorage, sop_uid, first)
    ds.Modality = "RTSTRUCT"
    ds.Manufacturer = "MEDFED PHANTOM"
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ""
    ds.SeriesDescription = description
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[series_uid, "rtstruct-series"])
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.StructureSetLabel = label
    ds.StructureSetDate = first.StudyDate
    ds.StructureSetTime = "120000"

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = series_uid
    series_ref.ContourImageSequence = DicomSequence([image_reference(header) for header in ordered])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = STUDY_COMPONENT_MANAGEMENT
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])

    rois, observations = [], []
    for number, structure in enumerate(structures, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
        roi.ROIName = structure.name
        roi.ROIGenerationAlgorithm = "MANUAL"
        rois.append(roi)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = structure.interpreted_type
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence([_roi_contour(number, structure, ordered)
                                           for number, structure in enumerate(structures, start=1)])
    ds.RTROIObservationsSequence = DicomSequence(observations)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path

"""De-identification of the DICOM metadata that leaves the hospital's files for the datasite.

Approach: an allow-list. Only the attributes listed in `acquisition_metadata` are kept; every other
attribute is dropped, which is what PS3.15 Annex E (Basic Application Level Confidentiality
Profile) asks for the identifying ones, and more. The subset of Annex E applied, and why:

  Patient's Name, Patient ID, Other Patient IDs, Birth Date, addresses,
  Referring/Performing Physician, Operators, Accession Number, Study ID     X: removed
  Institution Name/Address/Department, Station Name                          X: removed (a site
        identifier; the dataset already belongs to one site, so it adds nothing)
  Study/Series/Acquisition/Content dates and times                          X: removed, not shifted
        (no analysis here needs them; shifting would keep intervals we do not use)
  Study/Series/Frame of Reference UIDs                                      U: replaced by stable
        pseudonyms 2.25.<int> from HMAC-SHA256 under the site's secret (same UID, same pseudonym
        at that site; not reversible, nor linkable across sites, without the secret)
  SOP Instance UIDs, all other UIDs                                         X: removed
  Contrast/Bolus Agent                                                      X: removed; only the
        fact that an agent is recorded is kept (ContrastBolusAgentPresent)
  Series Description                                                        C: kept, cleaned
        (Clean Descriptors Option): the patient's ID, name parts, accession number, study ID and
        the study/birth dates are cut out wherever they appear as a separate token
  Patient's Age, Patient's Sex                                              K: kept (Retain Patient
        Characteristics Option) because harmonisation and cohort statistics use them; ages of 90
        years or more become ">=90Y" (HIPAA Safe Harbor aggregation)
  Manufacturer, Model, acquisition parameters                               K: kept (Retain Device
        Identity Option): needed to model scanner effects; they identify devices, not patients

The case identifier is "case-" + 10 hex characters of the HMAC of PatientID, StudyInstanceUID and
SeriesInstanceUID: stable at the site, one per image series.

Pixel data are not cleaned here (no burnt-in text check): cross-sectional MR/CT rarely carries it;
screen captures, which do, are rejected upstream for lack of geometry.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

MIN_SECRET_BYTES = 16
_REMOVED = "[removed]"
_FLOAT_FIELDS = ("MagneticFieldStrength", "SliceThickness", "SpacingBetweenSlices", "KVP", "RepetitionTime",
                 "EchoTime", "FlipAngle")
_TEXT_FIELDS = ("Modality", "Manufacturer", "ManufacturerModelName", "BodyPartExamined", "ScanningSequence",
                "ConvolutionKernel")
_DATE_FIELDS = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "PatientBirthDate")
_AGE = re.compile(r"^(\d{3})([DWMY])$")


def check_secret(secret: bytes) -> None:
    """Refuse secrets too short to stop someone from recomputing pseudonyms from guessed IDs."""
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the pseudonym secret must be at least {MIN_SECRET_BYTES} random bytes "
                         "(use the site's pseudonym key from its data dir)")


def _digest(secret: bytes, purpose: str, *parts: str) -> bytes:
    check_secret(secret)
    message = "\x00".join((purpose, *parts)).encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).digest()


def pseudonymize_uid(uid: str, secret: bytes) -> str:
    """A `2.25.<int>` UID (at most 44 characters) standing for `uid` at this site."""
    return "2.25." + str(int.from_bytes(_digest(secret, "uid", str(uid).strip())[:16], "big"))


def case_id(ds: Dataset, secret: bytes) -> str:
    """A short stable case pseudonym: one per image series (a study with T1 and T2 gives two cases)."""
    parts = (str(ds.get(k) or "").strip() for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"))
    return "case-" + _digest(secret, "case", *parts).hex()[:10]


def patient_pseudonym(ds: Dataset, secret: bytes) -> str:
    """A stable pseudonym of the patient: keeps one patient's series together (same split, one
    multi-image case) without the PatientID itself."""
    return pseudonym_of_patient_id(str(ds.get("PatientID") or ""), secret)


def pseudonym_of_patient_id(patient_id: str, secret: bytes) -> str:
    """`patient_pseudonym` from the PatientID alone (a site's own list of patients, e.g. its split file)."""
    return "patient-" + _digest(secret, "patient", patient_id.strip()).hex()[:12]


def pseudonymous_uids(ds: Dataset, secret: bytes) -> dict[str, str]:
    """Study, series and frame-of-reference pseudonyms, so analyses can group without the originals."""
    keys = {"StudyInstanceUID": "study_uid", "SeriesInstanceUID": "series_uid",
            "FrameOfReferenceUID": "frame_of_reference_uid"}
    return {name: pseudonymize_uid(str(ds.get(keyword)), secret) for keyword, name in keys.items() if ds.get(keyword)}


def acquisition_metadata(ds: Dataset) -> dict[str, str | float | int | list[float]]:
    """What analyses need about how the image was acquired, as plain values; absent values are left out."""
    out: dict[str, str | float | int | list[float]] = {}
    for keyword in _TEXT_FIELDS:
        text = _text(ds.get(keyword))
        if text:
            out[keyword] = text
    description = _clean_description(_text(ds.get("SeriesDescription")), ds)
    if description:
        out["SeriesDescription"] = description
    for keyword in _FLOAT_FIELDS:
        number = _number(ds.get(keyword))
        if number is not None:
            out[keyword] = number
    spacing = [_number(v) for v in (ds.get("PixelSpacing") or [])]
    if spacing and None not in spacing:
        out["PixelSpacing"] = spacing
    out["ContrastBolusAgentPresent"] = bool(_text(ds.get("ContrastBolusAgent")))
    age = _coarse_age(_text(ds.get("PatientAge")))
    if age:
        out["PatientAge"] = age
    sex = _text(ds.get("PatientSex")).upper()
    if sex in ("M", "F", "O"):
        out["PatientSex"] = sex
    return out


def _text(value: object) -> str:
    return "\\".join(str(v).strip() for v in _as_list(value))


def _number(value: object) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _coarse_age(age: str) -> str:
    match = _AGE.match(age)
    if not match:
        return ""
    if match.group(2) == "Y" and int(match.group(1)) >= 90:
        return ">=90Y"
    return age


def _identifying_tokens(ds: Dataset) -> set[str]:
    tokens = {_text(ds.get(k)) for k in ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID")}
    for keyword in ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName"):
        for name in _as_list(ds.get(keyword)):
            tokens.update(re.split(r"[\^=\s,]+", str(name)))
    for keyword in _DATE_FIELDS:
        date = _text(ds.get(keyword))
        if len(date) == 8 and date.isdigit():
            y, m, d = date[:4], date[4:6], date[6:]
            tokens |= {date, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}", f"{m}/{d}/{y}"}
    return {t for t in tokens if len(t) >= 2}


def _as_list(value: object) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _clean_description(text: str, ds: Dataset) -> str:
    """Cut identifiers that operators type into free text (e.g. 'T1 DOE_JOHN 20240101')."""
    for token in sorted(_identifying_tokens(ds), key=len, reverse=True):
        if text.isascii() and token.isascii() and token.lower() not in text.lower():
            continue  # cannot match (ASCII case folding is lower()); skips compiling a pattern per token and case
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(token)}(?![A-Za-z0-9])", _REMOVED, text, flags=re.IGNORECASE)
    return text

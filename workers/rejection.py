"""IHE IOCM rejection notes: withdraw result objects a newer version supersedes.

When a model runs again on a study (a new model version, a retried job with other
output), the PACS still holds the earlier SEG, SR and overlay images. A PACS that
implements IHE Imaging Object Change Management (IOCM) hides every instance listed in a
Key Object Selection Document whose title is (113001, DCM, "Rejected for Quality
Reasons"); :func:`build_rejection_note` builds that document. It is pure: it reads no
file and writes none (the caller writes it with
:func:`workers.storage.write_dataset_atomic`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from workers.contract import ResultInstance
from workers.dicom_encoding import keep_source_charset
from workers.seg import MANUFACTURER, pacsnode_version

__all__ = ["REJECTED_FOR_QUALITY_REASONS", "build_rejection_note"]

logger = logging.getLogger(__name__)


def _rejected_for_quality_reasons() -> PydicomCode | hd.sr.CodedConcept:
    try:
        code: PydicomCode = codes.DCM.RejectedForQualityReasons
    except AttributeError:  # a pydicom whose code dictionary lacks it
        return hd.sr.CodedConcept("113001", "DCM", "Rejected for Quality Reasons")
    return code


#: The document title that makes a KOS an IOCM rejection note (CID 7010).
REJECTED_FOR_QUALITY_REASONS = _rejected_for_quality_reasons()

#: SOP classes referenced as IMAGE content items; every other one is COMPOSITE. pydicom
#: does not know the label-map SEG class (Supplement 243), so both SEG classes are named.
_SEG_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})
_OTHER_IMAGE_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.30"})  # Parametric Map

#: Patient and study attributes copied from the source when it has them, besides those
#: highdicom copies itself (PatientID, PatientName, PatientBirthDate, PatientSex,
#: AccessionNumber, StudyID, StudyDate, StudyTime, ReferringPhysicianName).
_COPIED = (
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)


def _is_image(sop_class_uid: str) -> bool:
    """Whether TID 2010 references an instance of this SOP class as IMAGE."""
    if sop_class_uid in _SEG_CLASSES or sop_class_uid in _OTHER_IMAGE_CLASSES:
        return True
    return "Image Storage" in pydicom.uid.UID(sop_class_uid).name


def _evidence(source: Dataset, instance: ResultInstance) -> Dataset:
    """A minimal header of a rejected instance: the source's patient and study, its UIDs."""
    ds = Dataset()
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    ds.PatientID = source.get("PatientID", "")
    ds.PatientName = source.get("PatientName", "")
    ds.PatientBirthDate = source.get("PatientBirthDate", "")
    ds.PatientSex = source.get("PatientSex", "")
    ds.AccessionNumber = source.get("AccessionNumber", "")
    ds.StudyID = source.get("StudyID", "")
    ds.StudyDate = source.get("StudyDate", "")
    ds.StudyTime = source.get("StudyTime", "")
    ds.ReferringPhysicianName = source.get("ReferringPhysicianName", "")
    ds.StudyInstanceUID = instance.study_instance_uid
    ds.SeriesInstanceUID = instance.series_instance_uid
    ds.SOPClassUID = instance.sop_class_uid
    ds.SOPInstanceUID = instance.sop_instance_uid
    if _is_image(instance.sop_class_uid):
        # highdicom's KeyObjectSelection makes an IMAGE item of a dataset that has Rows
        # and Columns and a COMPOSITE item otherwise; it reads no value, so none is set.
        ds.Rows = None
        ds.Columns = None
    return ds


def _unique(
    source: Dataset, rejected: Sequence[ResultInstance], sop_instance_uid: str
) -> list[ResultInstance]:
    """``rejected`` checked and without repeats, in the order given."""
    if not rejected:
        raise ValueError("rejected must name at least one instance to withdraw. Found none.")
    study = str(source.StudyInstanceUID)
    seen: dict[str, ResultInstance] = {}
    for instance in rejected:
        if instance.study_instance_uid != study:
            raise ValueError(
                f"rejected instance {instance.sop_instance_uid} ({instance.name}) is in study "
                f"{instance.study_instance_uid}, not in the source's study {study}; a "
                "rejection note withdraws instances of its own study only."
            )
        if instance.sop_instance_uid == sop_instance_uid:
            raise ValueError(
                f"rejected instance {instance.sop_instance_uid} ({instance.name}) has the "
                "rejection note's own SOP Instance UID."
            )
        earlier = seen.get(instance.sop_instance_uid)
        if earlier is None:
            seen[instance.sop_instance_uid] = instance
        elif (earlier.series_instance_uid, earlier.sop_class_uid) != (
            instance.series_instance_uid,
            instance.sop_class_uid,
        ):
            raise ValueError(
                f"rejected instance {instance.sop_instance_uid} is listed twice with "
                f"different series or SOP class ({earlier.name}, {instance.name})."
            )
    return list(seen.values())


def build_rejection_note(
    source: Dataset,
    rejected: Sequence[ResultInstance],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    series_description: str,
) -> hd.ko.KeyObjectSelectionDocument:
    """Build an IHE IOCM rejection note that withdraws ``rejected``.

    IHE Radiology IOCM (Imaging Object Change Management) has a PACS hide, and
    eventually delete, the instances a Key Object Selection Document (PS3.3 A.35.4,
    content TID 2010) lists when its document title is (113001, DCM, "Rejected for
    Quality Reasons") from CID 7010. pacsnode sends one when a newer version of a job's
    results supersedes the objects it sent before, so the radiologist does not see two
    versions side by side. Every rejected instance is a content item of the document
    (IMAGE for SEG, Secondary Capture and other image SOP classes, COMPOSITE for SR, KOS
    and other non-image ones) and is listed once in the Current Requested Procedure
    Evidence Sequence under its series, as PS3.3 C.17.6.2 requires.

    Parameters
    ----------
    source
        One source image header of the study; the note copies its Patient and General
        Study attributes, so the PACS files it with the study it withdraws from.
    rejected
        The earlier objects to withdraw; all in the study of ``source``. An instance
        listed more than once is referenced once.
    series_instance_uid
        SeriesInstanceUID of the note's series.
    sop_instance_uid
        SOPInstanceUID of the note.
    series_number
        SeriesNumber of the note's series.
    series_description
        SeriesDescription of the note's series; cut to 64 characters.

    Returns
    -------
    highdicom.ko.KeyObjectSelectionDocument
        The rejection note, Explicit VR Little Endian, InstanceNumber 1.

    Raises
    ------
    ValueError
        If ``rejected`` is empty, an instance is in another study than ``source``, has
        the note's own SOP Instance UID, or is listed twice with different series or SOP
        classes.
    """
    instances = _unique(source, rejected, sop_instance_uid)
    evidence = [_evidence(source, instance) for instance in instances]
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS, referenced_objects=evidence
    )
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=pacsnode_version(),
        series_description=series_description[:64],
        specific_character_set=None,  # set by keep_source_charset
    )
    keep_source_charset(note, source)
    for keyword in _COPIED:
        if keyword in source:
            element = copy.deepcopy(source[keyword])
            note[element.tag] = element
    logger.info(
        "built rejection note withdrawing %d instances",
        len(instances),
        extra={"sop_instance_uid": str(note.SOPInstanceUID)},
    )
    return note

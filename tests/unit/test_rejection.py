"""IOCM rejection notes: title, references, evidence, patient and study, dciodvfy."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from models.base import Code, LabelSpec, SegmentationModel, Volume
from tests.dicom_factory import write_ct_series
from tests.peers import dciodvfy_errors
from tests.validation import enforce_valid_values  # noqa: F401 (autouse)
from workers.contract import ResultInstance
from workers.overlays import build_overlay_images, key_images
from workers.rejection import build_rejection_note
from workers.seg import MANUFACTURER, build_seg
from workers.series import LoadedSeries, load_series
from workers.sr import build_sr
from workers.storage import write_dataset_atomic
from workers.uids import ResultUids, derive_uid

ANATOMY = Code("123037004", "SCT", "Anatomical Structure")
SHAPE = (6, 32, 32)
SEG_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


class FakeOrgans(SegmentationModel):
    name = "fake_organs"
    version = "1.2.3"
    labels = (
        LabelSpec(1, "Liver", ANATOMY, Code("10200004", "SCT", "Liver"), (200, 100, 50)),
        LabelSpec(2, "Kidney", ANATOMY, Code("64033007", "SCT", "Kidney"), (0, 0, 255)),
    )
    algorithm_family = Code("113033", "DCM", "Artificial Intelligence")

    def predict(self, volume: Volume) -> npt.NDArray[np.uint8]:
        return np.zeros(volume.voxels.shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> LoadedSeries:
    hu = np.random.default_rng(3).integers(-1000, 1000, SHAPE).astype(np.int16)
    paths = write_ct_series(hu, tmp_path_factory.mktemp("ct"), spacing_mm=(2.5, 0.8, 0.7))
    return load_series(paths)


@pytest.fixture(scope="module")
def source(series: LoadedSeries) -> Dataset:
    return series.datasets[0]


def _result(ds: Dataset, path: Path) -> ResultInstance:
    return ResultInstance(
        path=str(write_dataset_atomic(ds, path)),
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
    )


@pytest.fixture(scope="module")
def earlier(series: LoadedSeries, tmp_path_factory: pytest.TempPathFactory) -> list[ResultInstance]:
    """The objects an earlier version sent: binary and label-map SEG, SR, overlays."""
    out = tmp_path_factory.mktemp("earlier")
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1:3, 4:10, 5:20] = 1
    labels[2:5, 20:30, 2:8] = 2
    model = FakeOrgans()
    uids = ResultUids.for_job(series.datasets[0].SeriesInstanceUID, model.name, "0.9", "d")
    seg, segments = build_seg(series, labels, model, uids)
    labelmap, _ = build_seg(series, labels, model, uids, seg_type="labelmap")
    sr, _ = build_sr(series, labels, model, seg, segments, uids)
    overlays = build_overlay_images(
        series,
        key_images(series, labels, segments),
        uids,
        series_number=903,
        series_description="fake_organs Overlay",
    )
    results = [
        _result(seg, out / "seg-binary.dcm"),
        _result(labelmap, out / "seg-labelmap.dcm"),
        _result(sr, out / "sr.dcm"),
    ]
    results += [_result(sc, out / f"overlay-{n}.dcm") for n, sc in enumerate(overlays, 1)]
    assert {r.sop_class_uid for r in results} == {*SEG_CLASSES, SR_CLASS, SC_CLASS}
    assert len(results) == 5
    return results


def _build(source: Dataset, rejected: list[ResultInstance]) -> hd.ko.KeyObjectSelectionDocument:
    return build_rejection_note(
        source,
        rejected,
        series_instance_uid=derive_uid("test", "rejection-series"),
        sop_instance_uid=derive_uid("test", "rejection-instance"),
        series_number=904,
        series_description="fake_organs rejection of 0.9 " + "x" * 80,
    )


def _content_references(ds: Dataset) -> dict[str, str]:
    """SOP Instance UID -> value type of every reference anywhere in the content tree."""
    found: dict[str, str] = {}

    def walk(items: list[Dataset]) -> None:
        for item in items:
            for ref in item.get("ReferencedSOPSequence", []):
                assert ref.ReferencedSOPInstanceUID not in found
                found[ref.ReferencedSOPInstanceUID] = item.ValueType
            walk(item.get("ContentSequence", []))

    walk(list(ds.ContentSequence))
    return found


def test_note_rejects_every_instance_and_is_valid(
    source: Dataset, earlier: list[ResultInstance], tmp_path: Path
) -> None:
    path = write_dataset_atomic(_build(source, earlier), tmp_path / "rejection.dcm")
    assert dciodvfy_errors(path) == []

    ds = dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert ds.Modality == "KO"
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    assert title.CodeMeaning == "Rejected for Quality Reasons"
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.PatientID == source.PatientID
    assert ds.PatientName == source.PatientName
    assert ds.StudyID == source.StudyID
    assert ds.Manufacturer == MANUFACTURER
    assert ds.SeriesNumber == 904
    assert ds.SeriesDescription == ("fake_organs rejection of 0.9 " + "x" * 80)[:64]

    # The content tree references exactly the rejected instances: SEG and Secondary
    # Capture as IMAGE, the SR as COMPOSITE.
    references = _content_references(ds)
    assert set(references) == {r.sop_instance_uid for r in earlier}
    for r in earlier:
        expected = "COMPOSITE" if r.sop_class_uid == SR_CLASS else "IMAGE"
        assert references[r.sop_instance_uid] == expected, r.name

    # The evidence lists each once, under its own series, in the source's study.
    (study,) = ds.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == source.StudyInstanceUID
    listed = Counter(
        (series.SeriesInstanceUID, sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID)
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    )
    assert listed == Counter(
        (r.series_instance_uid, r.sop_class_uid, r.sop_instance_uid) for r in earlier
    )
    assert "PertinentOtherEvidenceSequence" not in ds


def test_note_round_trips_through_highdicom(
    source: Dataset, earlier: list[ResultInstance], tmp_path: Path
) -> None:
    path = write_dataset_atomic(_build(source, earlier), tmp_path / "rejection.dcm")
    note = hd.ko.KeyObjectSelectionDocument.from_dataset(dcmread(path))
    assert note.content[0].name.value == "113001"
    references = note.content.get_references()
    assert {ref.referenced_sop_instance_uid for ref in references} == {
        r.sop_instance_uid for r in earlier
    }
    for r in earlier:
        assert note.resolve_reference(r.sop_instance_uid) == (
            r.study_instance_uid,
            r.series_instance_uid,
            r.sop_instance_uid,
        )


def test_repeated_instance_is_referenced_once(
    source: Dataset, earlier: list[ResultInstance]
) -> None:
    ds = _build(source, [*earlier, earlier[0]])
    assert set(_content_references(ds)) == {r.sop_instance_uid for r in earlier}
    (study,) = ds.CurrentRequestedProcedureEvidenceSequence
    assert sum(len(s.ReferencedSOPSequence) for s in study.ReferencedSeriesSequence) == 5


def test_source_patient_and_study_attributes_are_copied(
    source: Dataset, earlier: list[ResultInstance]
) -> None:
    with_issuer = Dataset()
    with_issuer.update(source)
    with_issuer.IssuerOfPatientID = "HOSPITAL"
    ds = _build(with_issuer, earlier[:1])
    assert ds.IssuerOfPatientID == "HOSPITAL"
    assert ds.StudyDescription == source.StudyDescription


def test_empty_rejection_is_an_error(source: Dataset) -> None:
    with pytest.raises(ValueError, match="at least one instance"):
        _build(source, [])


def test_instance_of_another_study_is_an_error(
    source: Dataset, earlier: list[ResultInstance]
) -> None:
    stranger = ResultInstance(
        path="/results/other/sr.dcm",
        study_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        sop_class_uid=SR_CLASS,
        sop_instance_uid=generate_uid(),
    )
    with pytest.raises(ValueError, match=rf"{stranger.sop_instance_uid} \(sr\.dcm\).*study"):
        _build(source, [*earlier, stranger])


def test_conflicting_duplicate_is_an_error(source: Dataset, earlier: list[ResultInstance]) -> None:
    clash = earlier[0].model_copy(update={"series_instance_uid": generate_uid()})
    with pytest.raises(ValueError, match=f"{earlier[0].sop_instance_uid} is listed twice"):
        _build(source, [earlier[0], clash])


def test_note_cannot_reject_itself(source: Dataset, earlier: list[ResultInstance]) -> None:
    itself = earlier[0].model_copy(
        update={"sop_instance_uid": derive_uid("test", "rejection-instance")}
    )
    with pytest.raises(ValueError, match="own SOP Instance UID"):
        _build(source, [itself])

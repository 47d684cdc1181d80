"""The hand-encoded parts of the SCP's hot path equal what pydicom/pynetdicom produce.

node/handlers.py builds file meta and finds the study/series UIDs without pydicom, and
node/transport.py encodes C-STORE responses and decodes C-STORE requests without it;
each is checked here against the library it stands in for.
"""

from __future__ import annotations

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode, encode_file_meta

from node.completeness import NOT_JUDGED, decode_geometry, geometry_of
from node.handlers import _encode_file_meta, _scan_header
from node.state import StudyInfo
from node.transport import _encode_c_store_rsp

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3", "1.2.34", "1.2.826.0.1.3680043.8.498.1"])
@pytest.mark.parametrize(
    "transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless]
)
def test_file_meta_matches_pynetdicom(sop_instance_uid: str, transfer_syntax: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    meta.FileMetaInformationVersion = b"\x00\x01"
    assert _encode_file_meta(CT_IMAGE, sop_instance_uid, transfer_syntax) == encode_file_meta(meta)


def _dataset(with_sequence: bool, undefined_length: bool) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality = "CT"
    ds.PatientName = "Doe^Jane"
    if with_sequence:
        item = Dataset()
        item.CodeValue = "X"
        item.CodingSchemeDesignator = "99TEST"
        item.CodeMeaning = "a code"
        ds.ProcedureCodeSequence = Sequence([item])
        ds["ProcedureCodeSequence"].is_undefined_length = undefined_length
    ds.StudyInstanceUID = "1.2.3.5"
    ds.SeriesInstanceUID = "1.2.3.55"
    ds.InstanceNumber = 1
    return ds


def _encoded(ds: Dataset, implicit: bool) -> bytes:
    encoded = encode(ds, implicit, True)
    assert encoded is not None
    return encoded


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("with_sequence", [True, False])
def test_uid_scan_finds_study_and_series(implicit: bool, with_sequence: bool) -> None:
    data = _encoded(_dataset(with_sequence, undefined_length=False), implicit)
    found = _scan_header(memoryview(data), implicit)
    assert found is not None
    assert found[:2] == ("1.2.3.5", "1.2.3.55")


@pytest.mark.parametrize("implicit", [True, False])
def test_header_scan_records_the_slice_geometry_as_pydicom_reads_it(implicit: bool) -> None:
    ds = _dataset(with_sequence=True, undefined_length=False)
    ds.ImagePositionPatient = ["-100.5", "-120", "37.25"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    found = _scan_header(memoryview(_encoded(ds, implicit)), implicit)
    assert found is not None
    assert found.geometry == geometry_of(ds)
    assert decode_geometry(found.geometry) == ([-100.5, -120.0, 37.25], [1, 0, 0, 0, 1, 0])
    ds.NumberOfFrames = 4  # multi-frame: its frames have their own positions
    found = _scan_header(memoryview(_encoded(ds, implicit)), implicit)
    assert found is not None
    assert found.geometry == NOT_JUDGED == geometry_of(ds)
    del ds.NumberOfFrames, ds.ImageOrientationPatient
    found = _scan_header(memoryview(_encoded(ds, implicit)), implicit)
    assert found is not None
    assert found.geometry == NOT_JUDGED


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        (None, "Doe^Jane"),
        ("ISO_IR 100", "Müller^Jürgen"),
        ("ISO_IR 192", "Wang^XiaoDong=王^小東"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
    ],
)
@pytest.mark.parametrize("implicit", [True, False])
def test_header_scan_records_the_study_details_as_pydicom_decodes_them(
    implicit: bool, charset: str | list[str] | None, name: str
) -> None:
    """The console lists studies by patient, accession number and date: the scan must
    decode them in the instance's own character set (pydicom encoded them in it)."""
    ds = _dataset(with_sequence=False, undefined_length=False)
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.PatientID = "PID-42"
    ds.AccessionNumber = "ACC7"
    ds.StudyDate = "20261130"
    ds.StudyDescription = "CT Thorax"
    encoded = _encoded(ds, implicit)
    found = _scan_header(memoryview(encoded), implicit)
    assert found is not None
    assert found.study == StudyInfo("PID-42", name, "ACC7", "20261130", "CT Thorax")


def test_uid_scan_gives_up_where_pydicom_is_needed() -> None:
    data = _encoded(_dataset(with_sequence=True, undefined_length=True), implicit=False)
    assert _scan_header(memoryview(data), implicit_vr=False) is None
    truncated = _encoded(_dataset(False, False), implicit=False)[:40]
    assert _scan_header(memoryview(truncated), implicit_vr=False) is None


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC000, 0xB000])
@pytest.mark.parametrize("message_id", [1, 7, 65535])
def test_c_store_response_matches_pynetdicom(status: int, message_id: int) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = CT_IMAGE
    primitive.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.12345"
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    expected = encode(message.command_set, True, True)
    assert (
        _encode_c_store_rsp(CT_IMAGE, message_id, status, "1.2.826.0.1.3680043.8.498.12345")
        == expected
    )

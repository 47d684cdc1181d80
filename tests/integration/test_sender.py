"""The sender against dcmtk storescp: a result file goes out exactly as written when the
destination accepts its transfer syntax, and is converted by pynetdicom (here to
Implicit VR Little Endian) when the destination accepts only another one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import Association

from node.config import Config
from node.sender import Sender
from node.state import DeliveryStateValues, JobStateValues, PlannedJob, StateDB
from tests.integration.conftest import make_phantom_series
from tests.peers import StoreSCP
from workers.contract import JobOutcome, JobRequest, Manifest, ManifestInstance

pytestmark = pytest.mark.integration


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What the sender handed to each C-STORE: a path (sent as written) or a dataset."""
    handed: list[object] = []
    original = Association.send_c_store

    def spy(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        handed.append(dataset)
        return original(self, dataset, *args, **kwargs)

    monkeypatch.setattr(Association, "send_c_store", spy)
    return handed


def _dataset_bytes(path: Path) -> bytes:
    """The file's dataset as encoded, after the preamble and file meta."""
    data = path.read_bytes()
    meta = dcmread(path, stop_before_pixels=True).file_meta
    meta_end = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    return data[meta_end:]


def _deliver(tmp_path: Path, destination: StoreSCP, files: list[Path]) -> StateDB:
    """One job whose results are ``files``, delivered to ``destination`` by one round."""
    pacs = {"ae_title": destination.ae_title, "host": "127.0.0.1", "port": destination.port}
    config = Config.model_validate({"destinations": {"pacs": pacs}})
    db = StateDB(tmp_path / "state.db")
    header = dcmread(files[0], stop_before_pixels=True)
    series, study = str(header.SeriesInstanceUID), str(header.StudyInstanceUID)
    db.record_instance(
        sop_instance_uid=str(header.SOPInstanceUID), sop_class_uid=str(header.SOPClassUID),
        series_instance_uid=series, study_instance_uid=study, calling_ae_title="SCANNER",
        path=files[0], size=0, sha256="0" * 64,
    )  # fmt: skip
    db.mark_series_complete(series)
    (job_id,) = db.route_series(series, [PlannedJob("ct-tissue", "r", ["pacs"], lineage="L")])
    manifest = Manifest(
        series_instance_uid=series,
        instances=(ManifestInstance(sop_instance_uid="1", path="/x", size=0, sha256="0" * 64),),
    )
    request = JobRequest(job_id=job_id, model="ct-tissue", manifest=manifest, output_dir="/out")
    db.mark_job_queued(job_id, "task", request)
    db.record_results(job_id, JobOutcome(status="ok"), {"pacs": files})
    assert Sender(config, db).tick() == len(files)
    return db


def test_files_go_out_as_written(tmp_path: Path, sent: list[object]) -> None:
    files = sorted(make_phantom_series(tmp_path / "ct", "SEND1").glob("*.dcm"))[:3]
    with StoreSCP() as destination:
        db = _deliver(tmp_path, destination, files)
        received = destination.wait_for_files(3)
        for path in files:
            uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
            (copy,) = [p for p in received if p.name.endswith(uid)]
            assert dcmread(copy).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert _dataset_bytes(copy) == _dataset_bytes(path)
    assert sent == files  # each streamed from its file (in order), not decoded
    (job,) = db.jobs()
    assert job.state == JobStateValues.DELIVERED
    assert all(d.sending_since is None for d in db.deliveries(job.id))


def test_a_destination_without_the_files_syntax_gets_them_converted(
    tmp_path: Path, sent: list[object]
) -> None:
    files = sorted(make_phantom_series(tmp_path / "ct", "SEND2").glob("*.dcm"))[:2]
    with StoreSCP(extra_args=["+xi"]) as destination:  # Implicit VR Little Endian only
        db = _deliver(tmp_path, destination, files)
        received = destination.wait_for_files(2)
        for path in files:
            source = dcmread(path)
            (copy,) = [dcmread(p) for p in received if p.name.endswith(source.SOPInstanceUID)]
            assert copy.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
            assert copy.PixelData == source.PixelData
            assert copy.PatientID == source.PatientID
    assert len(sent) == 2
    assert all(isinstance(dataset, Dataset) for dataset in sent)  # decoded to convert
    (job,) = db.jobs()
    assert [d.state for d in db.deliveries(job.id)] == [DeliveryStateValues.DELIVERED] * 2

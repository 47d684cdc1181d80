"""Versions of a job's results: slice gaps, the manifest a worker reads, and what a new
version's request says it replaces."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread

from node.completeness import missing_slices
from node.config import Config
from node.dispatch import Dispatcher
from node.state import JobStateValues, PlannedJob, StateDB
from tests.dicom_factory import chest_phantom, write_ct_series
from tests.job_requests import job_request
from workers.contract import JobOutcome, ResultInstance
from workers.pipeline import run_job

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def test_no_gap_in_a_regular_stack_in_any_order() -> None:
    positions = [(0.0, 0.0, 2.5 * k) for k in (3, 0, 4, 1, 2)]
    assert missing_slices(positions, AXIAL) == []


def test_a_missing_slice_is_named_by_its_position() -> None:
    positions = [(-100.0, -120.0, 5.0 * k) for k in range(10) if k != 4]
    assert missing_slices(positions, AXIAL) == [(-100.0, -120.0, 20.0)]


def test_two_missing_slices_in_one_gap_and_a_sagittal_stack() -> None:
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # normal along -x
    positions = [(-3.0 * k, 10.0, 20.0) for k in range(8) if k not in (2, 3)]
    assert missing_slices(positions, sagittal) == [(-6.0, 10.0, 20.0), (-9.0, 10.0, 20.0)]


def test_too_few_slices_or_duplicates_are_not_judged() -> None:
    assert missing_slices([(0.0, 0.0, 0.0), (0.0, 0.0, 10.0)], AXIAL) == []
    assert missing_slices([(0.0, 0.0, 0.0)] * 5, AXIAL) == []


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    phantom = chest_phantom((10, 64, 64), (5.0, 3.0, 3.0))
    return write_ct_series(phantom.hu, tmp_path / "ct", spacing_mm=phantom.spacing_mm)


def test_the_worker_reads_its_manifest_and_nothing_else(series: list[Path], tmp_path: Path) -> None:
    """A file that joins the folder after dispatch is not part of the job; the SEG
    references exactly the manifest's instances."""
    request = job_request(series[0].parent, "ct-tissue", tmp_path / "out")
    write_ct_series(
        np.full((1, 64, 64), 40, np.int16), tmp_path / "late", spacing_mm=(5.0, 3.0, 3.0), origin=(-100.0, -120.0, 0.0),
        series_instance_uid=str(dcmread(series[0]).SeriesInstanceUID),
    )  # fmt: skip
    (tmp_path / "late" / "ct_0001.dcm").rename(series[0].parent / "late.dcm")
    outcome = run_job(request)
    assert outcome.status == "ok", outcome.reason
    seg = dcmread(next(f.path for f in outcome.files if f.name == "seg-binary.dcm"))
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for item in s.ReferencedInstanceSequence
    }
    assert referenced == {str(dcmread(p).SOPInstanceUID) for p in series}


def test_a_file_changed_after_dispatch_fails_the_job_by_name(
    series: list[Path], tmp_path: Path
) -> None:
    request = job_request(series[0].parent, "ct-tissue", tmp_path / "out")
    ds = dcmread(series[3])
    ds.PixelData = np.zeros((64, 64), np.int16).tobytes()
    ds.save_as(series[3])
    outcome = run_job(request)
    assert outcome.status == "failed"
    assert outcome.reason is not None
    assert outcome.reason.startswith(f"instance {series[3].stem} changed after the job was created")
    assert not (tmp_path / "out").exists()
    series[1].unlink()
    assert "of the job's input is missing" in str(run_job(request).reason)


def test_the_same_input_gives_the_same_uids_and_other_input_new_ones(
    series: list[Path], tmp_path: Path
) -> None:
    def uids(folder: Path, out: Path) -> set[str]:
        outcome = run_job(job_request(folder, "ct-tissue", out))
        assert outcome.status == "ok", outcome.reason
        return {f.sop_instance_uid for f in outcome.files} | {
            f.series_instance_uid for f in outcome.files
        }

    first = uids(series[0].parent, tmp_path / "a")
    assert uids(series[0].parent, tmp_path / "b") == first
    series[-1].unlink()  # one instance fewer
    assert not uids(series[0].parent, tmp_path / "c") & first


def _instance(path: str, sop_class: str = "1.2.840.10008.5.1.4.1.1.66.4") -> ResultInstance:
    name = Path(path).name
    return ResultInstance(
        path=path,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.9." + str(len(name)),
        sop_class_uid=sop_class,
        sop_instance_uid="1.2.3.9.9." + str(int(hashlib.sha256(path.encode()).hexdigest()[:8], 16)),
    )


class _Sent:
    """Records send_task calls; the Celery side of dispatch is tested end to end."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def send_task(self, name: str, kwargs: dict[str, Any], queue: str) -> Any:
        self.calls.append(kwargs)
        return type("Result", (), {"id": f"task-{len(self.calls)}"})()


def test_a_new_version_waits_for_its_predecessor_and_names_what_it_replaces(
    tmp_path: Path,
) -> None:
    db = StateDB(tmp_path / "state.db")
    config = Config.model_validate(
        {
            "node": {"data_dir": str(tmp_path)},
            "destinations": {
                "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                "iocm": {
                    "ae_title": "IOCM", "host": "127.0.0.1", "port": 105,
                    "supersede": "rejection_note",
                },
            },
        }
    )  # fmt: skip
    app = _Sent()
    dispatcher = Dispatcher(config, db, app)  # type: ignore[arg-type]

    def receive(sop: str, content: str) -> None:
        db.record_instance(
            sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            series_instance_uid="1.2.3.4", study_instance_uid="1.2.3", calling_ae_title="S",
            path=Path(f"/spool/{sop}.dcm"), size=1, sha256=hashlib.sha256(content.encode()).hexdigest(),
        )  # fmt: skip
        db.mark_series_complete("1.2.3.4")

    planned = [PlannedJob("ct-tissue", "r", ["pacs", "iocm"], lineage="1.2.3/ct-tissue")]
    receive("1.1", "a")
    (first,) = db.route_series("1.2.3.4", planned)
    assert dispatcher.dispatch_pending() == 1
    receive("1.2", "b")  # late, while the first job is queued
    (second,) = db.route_series("1.2.3.4", planned)
    assert dispatcher.dispatch_pending() == 0  # waits: the first may still send results

    files = (
        _instance("/r/seg-binary.dcm"),
        _instance("/r/sr.dcm", "1.2.840.10008.5.1.4.1.1.88.34"),
    )
    db.record_results(
        first,
        JobOutcome(status="ok", files=files),
        {"pacs": [Path(f.path) for f in files], "iocm": [Path(f.path) for f in files]},
    )
    for delivery in db.deliveries(first):
        db.mark_delivery_done(delivery.id)
    assert dispatcher.dispatch_pending() == 1
    job = db.job(second)
    assert job is not None
    assert job.state == JobStateValues.QUEUED
    assert job.request is not None
    assert job.request.revision == 2
    assert job.request.predecessor is not None
    assert job.request.predecessor.reports == (files[1],)
    assert job.request.rejections == {"iocm": files}  # only where supersede asks for it
    assert app.calls[-1] == {"request": job.request.model_dump(mode="json")}
    db.close()


def _version(db: StateDB, content: str, *, shadow: bool = False) -> int:
    """Instance 1.1 of series 1.2.3.4 arrives with ``content``; the new job's id."""
    db.record_instance(
        sop_instance_uid="1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_instance_uid="1.2.3.4", study_instance_uid="1.2.3", calling_ae_title="S",
        path=Path(f"/spool/1.1_{content}.dcm"), size=1,
        sha256=hashlib.sha256(content.encode()).hexdigest(),
    )  # fmt: skip
    db.mark_series_complete("1.2.3.4")
    planned = [PlannedJob("ct-tissue", "r", [], lineage="1.2.3/ct-tissue", shadow=shadow)]
    (job_id,) = db.route_series("1.2.3.4", planned)
    return job_id


def test_a_version_waits_for_every_earlier_one_and_input_seen_again_gets_new_uids(
    tmp_path: Path,
) -> None:
    """v1 runs; v2 is created and superseded before it runs by v3, which must still wait
    for v1. Then the input goes back to what v1 had (A, B, A): a new version whose
    result key, and so whose UIDs, differ from v1's."""
    db = StateDB(tmp_path / "state.db")
    config = Config.model_validate({"node": {"data_dir": str(tmp_path)}})
    dispatcher = Dispatcher(config, db, _Sent())  # type: ignore[arg-type]
    v1 = _version(db, "A")
    assert dispatcher.dispatch_pending() == 1
    v2 = _version(db, "B")
    v3 = _version(db, "C")
    states = {job.id: job.state for job in db.jobs()}
    assert states == {
        v1: JobStateValues.QUEUED,
        v2: JobStateValues.SUPERSEDED,
        v3: JobStateValues.PENDING,
    }
    assert dispatcher.dispatch_pending() == 0  # v1 may still deliver: v3 waits for it
    db.record_results(v1, JobOutcome(status="ok"), {})
    assert dispatcher.dispatch_pending() == 1
    db.record_results(v3, JobOutcome(status="ok"), {})
    v4 = _version(db, "A")
    assert dispatcher.dispatch_pending() == 1
    first, last = db.job(v1), db.job(v4)
    assert first is not None
    assert first.request is not None
    assert last is not None
    assert last.request is not None
    assert last.manifest == first.manifest  # the same input as v1 ...
    assert (first.request.revision, last.request.revision) == (1, 3)
    assert last.request.result_key != first.request.result_key  # ... but new objects
    db.close()


@pytest.mark.parametrize("geometry", ["recorded on receipt", "read from the files"])
def test_a_gap_waits_once_for_a_complete_series_and_never_loops(
    tmp_path: Path, geometry: str
) -> None:
    """The same with the slice geometry the node recorded on receipt (the files are
    gone: the check reads none) and with a DB from before that (schema 3)."""
    from node.completeness import geometry_of
    from node.routing import _check_gaps
    from node.state import SeriesPlan, SeriesStateValues
    from workers.contract import file_digest

    phantom = chest_phantom((12, 64, 64), (5.0, 3.0, 3.0))
    files = write_ct_series(phantom.hu, tmp_path / "ct", spacing_mm=phantom.spacing_mm)
    files[6].unlink()
    db = StateDB(tmp_path / "state.db")
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    recorded = geometry == "recorded on receipt"
    for path in files[:6] + files[7:]:
        size, sha256 = file_digest(path)
        header = dcmread(path)
        db.record_instance(
            sop_instance_uid=str(header.SOPInstanceUID),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_instance_uid=series_uid,
            study_instance_uid="1.2.3", calling_ae_title="S", path=path, size=size, sha256=sha256,
            geometry=geometry_of(header) if recorded else None,
        )  # fmt: skip
        if recorded:
            path.unlink()
    db.mark_series_complete(series_uid)
    plans = {series_uid: SeriesPlan([PlannedJob("ct-tissue", "r", [], lineage="1.2.3/ct")])}
    assert _check_gaps(db, plans) is None  # complete: one more quiet period
    record = db.series(series_uid)
    assert record is not None
    assert (record.state, record.gap_waits) == (SeriesStateValues.RECEIVING, 1)
    assert record.reason is not None
    assert "(-100.00, -120.00, -20.00)" in record.reason

    # Routed before (e.g. a new model for it after a late series): fails at once.
    db.mark_series_complete(series_uid)
    db.route_series(series_uid, [])
    fresh = {series_uid: SeriesPlan([PlannedJob("ct-tissue", "r", [], lineage="1.2.3/new")])}
    checked = _check_gaps(db, fresh)
    assert checked is not None
    (job,) = checked[series_uid].jobs
    assert job.failed_reason is not None
    assert job.failed_reason.startswith(f"1 slice(s) missing from series {series_uid}")
    db.close()


def test_a_rejection_note_is_not_a_report_of_its_version() -> None:
    sr = _instance("/r/sr.dcm", "1.2.840.10008.5.1.4.1.1.88.34")
    note = _instance("/r/rejection-001.dcm", "1.2.840.10008.5.1.4.1.1.88.59")
    outcome = JobOutcome(
        status="ok", files=(_instance("/r/seg-binary.dcm"), sr, note),
        rejection_notes={"iocm": "rejection-001.dcm"},
    )  # fmt: skip
    assert outcome.reports == (sr,)


def test_a_live_version_does_not_replace_shadow_results(tmp_path: Path) -> None:
    """Shadow results were never sent: the first live job is revision 1, with no
    predecessor SR for the PACS to look for."""
    db = StateDB(tmp_path / "state.db")
    config = Config.model_validate({"node": {"data_dir": str(tmp_path)}})
    dispatcher = Dispatcher(config, db, _Sent())  # type: ignore[arg-type]

    trial = _version(db, "A", shadow=True)
    assert dispatcher.dispatch_pending() == 1
    sr = _instance("/r/sr.dcm", "1.2.840.10008.5.1.4.1.1.88.34")
    db.record_results(trial, JobOutcome(status="ok", files=(sr,)), {})
    live = _version(db, "B")
    assert dispatcher.dispatch_pending() == 1
    job = db.job(live)
    assert job is not None
    assert job.request is not None
    assert (job.request.revision, job.request.predecessor) == (1, None)
    db.close()

"""The state DB: each transition, late instances, delivery bookkeeping, retry."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from node.state import (
    SCHEMA_VERSION,
    DeliveryStateValues,
    JobStateValues,
    PlannedJob,
    Receipt,
    ReceiptValues,
    SeriesStateValues,
    StateDB,
    StateDBError,
    StudyInfo,
)
from workers.contract import JobOutcome, JobRequest, Manifest, ManifestInstance

SERIES = "1.2.3.4"
STUDY = "1.2.3"
OK = JobOutcome(status="ok")


@pytest.fixture
def db(tmp_path: Path) -> StateDB:
    return StateDB(tmp_path / "state.db")


def _receive(
    db: StateDB,
    sop: str,
    at: float,
    content: str = "",
    *,
    series: str = SERIES,
    rerun_late: bool = True,
) -> Receipt:
    return db.record_instance(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_instance_uid=series,
        study_instance_uid=STUDY,
        calling_ae_title="SCANNER",
        path=Path(f"/spool/{series}/{sop}.dcm"),
        size=len(content),
        sha256=hashlib.sha256((sop + content).encode()).hexdigest(),
        rerun_late=rerun_late,
        received_at=at,
    )


def _request(job_id: int) -> JobRequest:
    job_manifest = Manifest(
        series_instance_uid=SERIES,
        instances=(ManifestInstance(sop_instance_uid="1", path="/x", size=0, sha256="0" * 64),),
    )
    return JobRequest(job_id=job_id, model="m", manifest=job_manifest, output_dir="/out")


def test_series_completes_after_quiet_period_and_keep_leaves_late_instances_out(
    db: StateDB,
) -> None:
    assert _receive(db, "1.1", at=100.0).kind == ReceiptValues.NEW
    assert _receive(db, "1.2", at=105.0).kind == ReceiptValues.NEW
    assert _receive(db, "1.2", at=106.0).kind == ReceiptValues.DUPLICATE  # one record
    assert db.instance_count(SERIES) == 2
    assert db.series_quiet_since(106.0) == []  # a duplicate keeps a receiving series open
    assert [s.series_instance_uid for s in db.series_quiet_since(106.5)] == [SERIES]

    db.mark_series_complete(SERIES)
    receipt = _receive(db, "1.3", at=200.0, rerun_late=False)
    assert (receipt.kind, receipt.late, receipt.reopened) == (ReceiptValues.NEW, True, False)
    record = db.series(SERIES)
    assert record is not None
    assert record.state == SeriesStateValues.COMPLETE
    assert record.late_instances == 1
    assert db.instance_count(SERIES) == 2  # late ones are kept but not part of the series
    assert db.known_sop_instance_uids() == {"1.1", "1.2", "1.3"}


def test_a_late_instance_reopens_its_series_with_rerun(db: StateDB) -> None:
    _receive(db, "1.1", at=100.0)
    db.mark_series_complete(SERIES)
    db.route_series(SERIES, [PlannedJob("ct-tissue", "r", ["pacs"], lineage="L")])
    receipt = _receive(db, "1.2", at=200.0)
    assert (receipt.kind, receipt.late, receipt.reopened) == (ReceiptValues.NEW, True, True)
    record = db.series(SERIES)
    assert record is not None
    assert (record.state, record.reopened, record.last_received) == (
        SeriesStateValues.RECEIVING,
        1,
        200.0,
    )
    assert db.instance_count(SERIES) == 2  # now part of the series


def test_identical_resend_of_a_routed_instance_changes_nothing(db: StateDB) -> None:
    _receive(db, "1.1", at=100.0)
    db.mark_series_complete(SERIES)
    db.route_series(SERIES, [PlannedJob("ct-tissue", "r", ["pacs"], lineage="L")])
    before = db.series(SERIES)
    assert _receive(db, "1.1", at=300.0) == Receipt(ReceiptValues.DUPLICATE)
    assert db.series(SERIES) == before  # not late, not reopened, not touched
    assert db.instance_count(SERIES) == 1


def test_changed_resend_replaces_the_instance_and_reopens(db: StateDB) -> None:
    _receive(db, "1.1", at=100.0)
    _receive(db, "1.2", at=100.0)
    db.mark_series_complete(SERIES)
    db.route_series(SERIES, [PlannedJob("ct-tissue", "r", ["pacs"], lineage="L")])
    first = db.manifest(SERIES)
    receipt = _receive(db, "1.2", at=200.0, content="other pixels")
    assert (receipt.kind, receipt.reopened) == (ReceiptValues.CHANGED, True)
    second = db.manifest(SERIES)
    assert first is not None
    assert second is not None
    assert len(second.instances) == 2
    assert second.digest != first.digest
    changed = {i.sop_instance_uid: i for i in second.instances}["1.2"]
    assert changed.sha256 == hashlib.sha256(b"1.2other pixels").hexdigest()
    assert changed.size == len("other pixels")


def test_an_instance_moved_to_another_series_leaves_the_old_one(db: StateDB) -> None:
    _receive(db, "1.1", at=100.0)
    _receive(db, "1.2", at=100.0)
    receipt = _receive(db, "1.2", at=101.0, series="1.2.3.5")
    assert receipt.kind == ReceiptValues.CHANGED
    assert db.instance_count(SERIES) == 1
    assert db.instance_count("1.2.3.5") == 1


def test_routing_creates_one_job_per_model_once(db: StateDB) -> None:
    _receive(db, "1.1", at=1.0)
    planned = [PlannedJob("ct-tissue", "r", ["pacs"], lineage="L")]
    assert db.route_series(SERIES, planned) == []  # not complete yet
    db.mark_series_complete(SERIES)
    ids = db.route_series(SERIES, planned)
    assert len(ids) == 1
    assert db.route_series(SERIES, planned) == []  # same input: nothing new
    job = db.job(ids[0])
    assert job is not None
    assert (job.state, job.destinations, job.study_instance_uid, job.lineage) == (
        JobStateValues.PENDING,
        ("pacs",),
        STUDY,
        "L",
    )
    assert job.manifest == db.manifest(SERIES)
    assert job.source_paths == [Path(f"/spool/{SERIES}/1.1.dcm")]


def test_new_input_makes_a_new_version_that_names_its_predecessor(db: StateDB) -> None:
    _receive(db, "1.1", at=1.0)
    db.mark_series_complete(SERIES)
    planned = [PlannedJob("ct-tissue", "r", ["pacs"], lineage="L")]
    (first,) = db.route_series(SERIES, planned)
    db.mark_job_queued(first, "task-1", _request(first))
    _receive(db, "1.2", at=2.0)  # late: the series reopens
    db.mark_series_complete(SERIES)
    (second,) = db.route_series(SERIES, planned)
    old, new = db.job(first), db.job(second)
    assert old is not None
    assert new is not None
    assert (old.state, old.superseded_by) == (JobStateValues.QUEUED, second)  # still runs
    assert (new.predecessor_id, new.state) == (first, JobStateValues.PENDING)
    assert new.manifest is not None
    assert len(new.manifest.instances) == 2
    assert old.manifest is not None
    assert len(old.manifest.instances) == 1
    db.mark_job_failed(first, "x")
    with pytest.raises(ValueError, match=f"job {first} was replaced by job {second}"):
        db.retry_job(first)


def test_a_version_not_yet_dispatched_is_superseded_and_never_runs(db: StateDB) -> None:
    _receive(db, "1.1", at=1.0)
    db.mark_series_complete(SERIES)
    planned = [PlannedJob("ct-tissue", "r", ["pacs"], lineage="L")]
    (first,) = db.route_series(SERIES, planned)
    _receive(db, "1.1", at=2.0, content="changed")
    db.mark_series_complete(SERIES)
    (second,) = db.route_series(SERIES, planned)
    old = db.job(first)
    assert old is not None
    assert (old.state, old.superseded_by) == (JobStateValues.SUPERSEDED, second)
    assert [job.id for job in db.jobs([JobStateValues.PENDING])] == [second]


def test_previous_results_walks_back_to_the_last_version_with_results(db: StateDB) -> None:
    planned = [PlannedJob("ct-tissue", "r", ["pacs"], lineage="L")]
    ids = []
    for number in range(3):
        _receive(db, f"1.{number}", at=float(number))
        db.mark_series_complete(SERIES)
        (job_id,) = db.route_series(SERIES, planned)
        db.mark_job_queued(job_id, f"task-{job_id}", _request(job_id))
        ids.append(job_id)
        if number == 0:
            db.record_results(job_id, OK, {})
        else:
            db.mark_job_failed(job_id, "broken")
    last = db.job(ids[-1])
    assert last is not None
    previous = db.previous_results(last)
    assert previous is not None
    assert previous.id == ids[0]
    assert db.latest_version("L") == last


def test_a_db_of_another_schema_is_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY)")
    old.commit()
    old.close()
    with pytest.raises(StateDBError, match=r"schema 0; this one needs schema \d+\. Stop the node"):
        StateDB(path)


def test_a_schema_3_db_is_brought_to_the_current_schema_in_place(tmp_path: Path) -> None:
    """A DB from before geometry, stage times and study details were recorded keeps its
    rows; their geometry is unknown (None: the gap check reads their files), new ones
    carry it, the stage times and delivery attempts are recorded from now on, and its
    studies are listed without patient details."""
    from node.state import _MIGRATIONS

    path = tmp_path / "state.db"
    db = StateDB(path)
    _receive(db, "1.1", at=1.0)
    db.close()
    old = sqlite3.connect(path)  # as schema 3 had it
    for step in _MIGRATIONS[3]:
        _, _, table, _, _, column, *_ = step.split()
        old.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    old.execute("DROP TABLE delivery_attempts")
    old.execute("DROP TABLE studies")
    old.execute("ALTER TABLE deliveries DROP COLUMN sending_since")
    old.execute("PRAGMA user_version = 3")
    old.commit()
    old.close()
    db = StateDB(path)
    db.record_instance(
        sop_instance_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_instance_uid=SERIES, study_instance_uid=STUDY, calling_ae_title="SCANNER",
        path=Path(f"/spool/{SERIES}/1.2.dcm"), size=0, sha256="0" * 64,
        geometry="0\\0\\1|1\\0\\0\\0\\1\\0",
    )  # fmt: skip
    assert db.instance_geometries(SERIES) == [
        (Path(f"/spool/{SERIES}/1.1.dcm"), None),
        (Path(f"/spool/{SERIES}/1.2.dcm"), "0\\0\\1|1\\0\\0\\0\\1\\0"),
    ]
    assert db.mark_series_complete(SERIES)
    record = db.series(SERIES)
    assert record is not None
    assert record.completed_at is not None
    assert record.routed_at is None
    studies = db.select("SELECT study_instance_uid, patient_id, first_received FROM studies")
    assert [tuple(row) for row in studies] == [(STUDY, None, 1.0)]
    db.close()
    version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION == 6


def test_unmatched_series_is_ignored_with_reason(db: StateDB) -> None:
    _receive(db, "1.1", at=1.0)
    db.mark_series_complete(SERIES)
    assert db.route_series(SERIES, [], reason="no rule matches") == []
    record = db.series(SERIES)
    assert record is not None
    assert (record.state, record.reason) == (SeriesStateValues.IGNORED, "no rule matches")


def _job(db: StateDB, destinations: list[str]) -> int:
    _receive(db, "1.1", at=1.0)
    db.mark_series_complete(SERIES)
    return db.route_series(SERIES, [PlannedJob("ct-tissue", "r", destinations, lineage="L")])[0]


def test_job_lifecycle_to_delivered(db: StateDB) -> None:
    job_id = _job(db, ["a", "b"])
    db.mark_job_queued(job_id, "task-1", _request(job_id))
    db.mark_job_running(job_id)
    files = {"a": [Path("/r/seg-binary.dcm"), Path("/r/sr.dcm")], "b": [Path("/r/sr.dcm")]}
    assert db.record_results(job_id, OK, files)
    assert not db.record_results(job_id, OK, files)  # a redelivered task
    deliveries = db.due_deliveries(now=10**10)
    assert sorted((d.destination, d.path.name) for d in deliveries) == [
        ("a", "seg-binary.dcm"), ("a", "sr.dcm"), ("b", "sr.dcm"),
    ]  # fmt: skip
    db.postpone_delivery(deliveries[0].id, next_attempt_at=10**11, reason="refused")
    assert len(db.due_deliveries(now=10**10)) == 2
    for delivery in deliveries:
        db.mark_delivery_done(delivery.id)
        job = db.job(job_id)
        assert job is not None
        expected = (
            JobStateValues.DELIVERED if delivery is deliveries[-1] else JobStateValues.RESULTS_READY
        )
        assert job.state == expected
    # Each stage has its time, in the order the stages happened, and each try its entry.
    job = db.job(job_id)
    assert job is not None
    assert job.dispatched_at is not None
    assert job.started_at is not None
    assert job.results_at is not None
    assert job.created_at <= job.dispatched_at <= job.started_at <= job.results_at
    first = db.deliveries(job_id)[0]
    assert first.delivered_at is not None
    assert first.last_attempt_at == first.delivered_at >= job.results_at
    tries = db.delivery_attempts(first.id)
    assert [(t.outcome, t.reason) for t in tries] == [("retry", "refused"), ("delivered", None)]
    assert tries[0].at <= tries[1].at == first.delivered_at


def test_a_send_cut_by_a_crash_is_recorded_and_due_again(db: StateDB) -> None:
    """A C-STORE under way when the node died is an attempt that may have reached the
    destination; start-up records it so and makes the file due again. Files whose send
    finished (acknowledged or postponed) are not touched."""
    job_id = _job(db, ["pacs"])
    db.mark_job_queued(job_id, "task-1", _request(job_id))
    files = [Path("/r/seg.dcm"), Path("/r/sr.dcm"), Path("/r/sc.dcm")]
    db.record_results(job_id, OK, {"pacs": files})
    done, cut, postponed = db.deliveries(job_id)
    for delivery in (done, cut, postponed):
        db.begin_sending(delivery.id)
    db.mark_delivery_done(done.id)
    db.postpone_delivery(postponed.id, next_attempt_at=10**11, reason="refused")
    # ... and here the node is killed, then started again:
    (interrupted,) = db.settle_interrupted_deliveries()
    assert (interrupted.id, interrupted.path) == (cut.id, files[1])
    assert interrupted.sending_since is not None
    assert db.settle_interrupted_deliveries() == []  # once only
    after = {d.id: d for d in db.deliveries(job_id)}
    assert all(d.sending_since is None for d in after.values())
    assert (after[cut.id].state, after[cut.id].attempts) == (DeliveryStateValues.PENDING, 1)
    assert after[cut.id].last_attempt_at == interrupted.sending_since
    assert [d.id for d in db.due_deliveries(now=10**10)] == [cut.id]
    (attempt,) = db.delivery_attempts(cut.id)
    assert attempt.outcome == "retry"
    assert attempt.reason is not None
    assert "destination may already hold it" in attempt.reason


def test_series_record_when_they_completed_and_were_routed(db: StateDB) -> None:
    _receive(db, "1.1", at=100.0)
    record = db.series(SERIES)
    assert record is not None
    assert (record.completed_at, record.routed_at) == (None, None)
    db.mark_series_complete(SERIES)
    db.route_series(SERIES, [PlannedJob("ct-tissue", "r", ["pacs"], lineage="L")])
    record = db.series(SERIES)
    assert record is not None
    assert record.completed_at is not None
    assert record.routed_at is not None
    assert record.first_received <= record.completed_at <= record.routed_at


def test_failed_delivery_fails_the_job_with_reason_and_retry_resets(db: StateDB) -> None:
    job_id = _job(db, ["pacs"])
    db.mark_job_queued(job_id, "task-1", _request(job_id))
    db.record_results(job_id, OK, {"pacs": [Path("/r/seg.dcm")]})
    (delivery,) = db.deliveries(job_id)
    db.mark_delivery_failed(delivery.id, "association permanently rejected")
    job = db.job(job_id)
    assert job is not None
    assert job.state == JobStateValues.FAILED
    assert job.reason == "delivery failed: pacs: association permanently rejected"
    assert db.deliveries(job_id)[0].state == DeliveryStateValues.FAILED

    assert [t.outcome for t in db.delivery_attempts(delivery.id)] == ["failed"]

    retried = db.retry_job(job_id)
    assert (retried.state, retried.reason, retried.attempts) == (JobStateValues.PENDING, None, 0)
    assert (retried.started_at, retried.results_at) == (None, None)
    assert db.deliveries(job_id) == []
    assert db.delivery_attempts(delivery.id) == []  # gone with its delivery


def test_a_requeued_job_that_never_started_keeps_its_attempts(db: StateDB) -> None:
    job_id = _job(db, ["pacs"])
    for _ in range(5):  # five worker restarts while it waits in the queue
        db.mark_job_queued(job_id, "task-1", _request(job_id))
        db.mark_job_pending(job_id, "requeued after the worker was restarted", never_started=True)
    job = db.job(job_id)
    assert job is not None
    assert (job.state, job.attempts) == (JobStateValues.PENDING, 0)
    db.mark_job_queued(job_id, "task-2", _request(job_id))
    db.mark_job_running(job_id)
    db.mark_job_pending(job_id, "requeued after the worker was restarted")
    job = db.job(job_id)
    assert job is not None
    assert job.attempts == 1  # a run counts


def test_retry_refuses_unknown_and_running_jobs(db: StateDB) -> None:
    with pytest.raises(KeyError, match="there is no job 42"):
        db.retry_job(42)
    job_id = _job(db, [])
    db.mark_job_queued(job_id, "task-1", _request(job_id))
    with pytest.raises(ValueError, match=f"job {job_id} is queued; only failed, cancelled, "):
        db.retry_job(job_id)


def test_a_study_is_recorded_with_its_first_instance_details(db: StateDB) -> None:
    first = StudyInfo("PID1", "Doe^Jane", "ACC1", "20261130", "CT Thorax")
    later = StudyInfo("OTHER", "Other^Name", "ACC2", "20260101", "changed")
    for sop, info in (("1.1", first), ("1.2", later)):
        db.record_instance(
            sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            series_instance_uid=SERIES, study_instance_uid=STUDY, calling_ae_title="SCANNER",
            path=Path(f"/spool/{sop}.dcm"), size=0, sha256=sop * 32, study=info,
            received_at=5.0,
        )  # fmt: skip
    rows = db.select("SELECT * FROM studies")
    assert [tuple(row) for row in rows] == [(STUDY, *first, 5.0)]


def test_cancel_stops_a_job_and_its_pending_deliveries(db: StateDB) -> None:
    job_id = _job(db, ["a", "b"])
    db.mark_job_queued(job_id, "task-1", _request(job_id))
    files = {"a": [Path("/r/seg-binary.dcm")], "b": [Path("/r/sr.dcm")]}
    assert db.record_results(job_id, OK, files)
    first, second = db.deliveries(job_id)
    db.mark_delivery_done(first.id)
    job = db.cancel_job(job_id, "cancelled from the console by 127.0.0.1")
    assert job.state == JobStateValues.CANCELLED
    assert job.reason == "cancelled from the console by 127.0.0.1"
    states = [(d.destination, d.state) for d in db.deliveries(job_id)]
    assert states == [("a", DeliveryStateValues.DELIVERED), ("b", DeliveryStateValues.FAILED)]
    assert [a.outcome for a in db.delivery_attempts(second.id)] == ["cancelled"]
    assert db.due_deliveries(now=1e12) == []
    assert not db.record_results(job_id, OK, files)  # a late result is dropped
    with pytest.raises(ValueError, match=f"job {job_id} is cancelled; there is nothing to cancel"):
        db.cancel_job(job_id, "again")
    with pytest.raises(KeyError, match="there is no job 42"):
        db.cancel_job(42, "x")
    with pytest.raises(ValueError, match="was cancelled; retry the job instead"):
        db.resend_delivery(second.id, "x")
    assert db.retry_job(job_id).state == JobStateValues.PENDING


def test_resend_puts_a_failed_delivery_back_with_a_fresh_budget(
    db: StateDB, tmp_path: Path
) -> None:
    job_id = _job(db, ["a", "b"])
    db.mark_job_queued(job_id, "task-1", _request(job_id))
    sr = tmp_path / "sr.dcm"
    sr.write_bytes(b"SR")
    assert db.record_results(job_id, OK, {"a": [sr], "b": [sr]})
    good, bad = db.deliveries(job_id)
    db.mark_delivery_done(good.id)
    db.postpone_delivery(bad.id, 0.0, "refused")
    with pytest.raises(ValueError, match=f"delivery {bad.id} is still pending"):
        db.resend_delivery(bad.id, "x")
    db.mark_delivery_failed(bad.id, "gave up")
    job = db.job(job_id)
    assert job is not None
    assert job.state == JobStateValues.FAILED
    resent = db.resend_delivery(bad.id, "re-send requested by 127.0.0.1")
    assert (resent.state, resent.attempts, resent.reason) == (DeliveryStateValues.PENDING, 0, None)
    assert [a.outcome for a in db.delivery_attempts(bad.id)] == ["retry", "failed", "resend"]
    job = db.job(job_id)
    assert job is not None
    assert (job.state, job.reason) == (JobStateValues.RESULTS_READY, None)
    assert [d.id for d in db.due_deliveries(now=1e12)] == [bad.id]
    db.mark_delivery_done(bad.id)
    job = db.job(job_id)
    assert job is not None
    assert job.state == JobStateValues.DELIVERED
    with pytest.raises(KeyError, match="there is no delivery 99"):
        db.resend_delivery(99, "x")
    sr.unlink()  # retention removed the results
    with pytest.raises(ValueError, match=r"sr\.dcm is gone \(removed by retention\); retry job"):
        db.resend_delivery(bad.id, "x")


def test_job_without_destinations_is_done_when_results_are_in(db: StateDB) -> None:
    job_id = _job(db, [])
    db.mark_job_queued(job_id, "task-1", _request(job_id))
    db.record_results(job_id, OK, {})
    job = db.job(job_id)
    assert job is not None
    assert job.state == JobStateValues.DELIVERED
    assert job.attempts == 1


def test_a_job_the_model_cannot_take_is_recorded_as_skipped(db: StateDB) -> None:
    _receive(db, "1.1", at=1.0)
    db.mark_series_complete(SERIES)
    ids = db.route_series(
        SERIES,
        [
            PlannedJob("ct-tissue", "r", ["pacs"], lineage="L"),
            PlannedJob("mr-model", "r", ["pacs"], skipped_reason="modality CT, the model takes MR"),
        ],
    )
    assert len(ids) == 1
    states = {(job.model, job.state, job.reason) for job in db.jobs()}
    assert states == {
        ("ct-tissue", JobStateValues.PENDING, None),
        ("mr-model", JobStateValues.SKIPPED, "modality CT, the model takes MR"),
    }


def test_a_shadow_job_keeps_its_results_and_sends_nothing(db: StateDB) -> None:
    _receive(db, "1.1", at=1.0)
    db.mark_series_complete(SERIES)
    (job_id,) = db.route_series(
        SERIES, [PlannedJob("ct-tissue", "trial", [], lineage="L", shadow=True)]
    )
    db.mark_job_queued(job_id, "task-1", _request(job_id))
    assert db.record_results(job_id, OK, {})
    job = db.job(job_id)
    assert job is not None
    assert (job.state, job.shadow, job.destinations) == (JobStateValues.KEPT, True, ())
    assert db.deliveries(job_id) == []
    assert db.retry_job(job_id).state == JobStateValues.PENDING

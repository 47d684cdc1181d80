"""The state DB: each transition, late instances, delivery bookkeeping, retry."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.state import (
    DeliveryStateValues,
    JobStateValues,
    PlannedJob,
    SeriesStateValues,
    StateDB,
)

SERIES = "1.2.3.4"
STUDY = "1.2.3"


@pytest.fixture
def db(tmp_path: Path) -> StateDB:
    return StateDB(tmp_path / "state.db")


def _receive(db: StateDB, sop: str, at: float) -> bool:
    return db.record_instance(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_instance_uid=SERIES,
        study_instance_uid=STUDY,
        calling_ae_title="SCANNER",
        path=Path(f"/spool/{sop}.dcm"),
        received_at=at,
    )


def test_series_completes_after_quiet_period_and_late_instances_are_kept(db: StateDB) -> None:
    assert not _receive(db, "1.1", at=100.0)
    assert not _receive(db, "1.2", at=105.0)
    assert not _receive(db, "1.2", at=106.0)  # the same instance again: one record
    assert db.instance_count(SERIES) == 2
    assert db.series_quiet_since(106.0) == []
    assert [s.series_instance_uid for s in db.series_quiet_since(106.5)] == [SERIES]

    db.mark_series_complete(SERIES)
    assert _receive(db, "1.3", at=200.0)  # late
    record = db.series(SERIES)
    assert record is not None
    assert record.state == SeriesStateValues.COMPLETE
    assert record.late_instances == 1
    assert db.instance_count(SERIES) == 2  # late ones are kept but not part of the series
    assert len(db.known_instance_paths()) == 3


def test_routing_creates_one_job_per_model_once(db: StateDB) -> None:
    _receive(db, "1.1", at=1.0)
    assert (
        db.route_series(SERIES, [PlannedJob("ct-tissue", "r", ["pacs"])]) == []
    )  # not complete yet
    db.mark_series_complete(SERIES)
    ids = db.route_series(SERIES, [PlannedJob("ct-tissue", "r", ["pacs"])])
    assert len(ids) == 1
    assert db.route_series(SERIES, [PlannedJob("ct-tissue", "r", ["pacs"])]) == []  # already routed
    job = db.job(ids[0])
    assert job is not None
    assert (job.state, job.destinations, job.study_instance_uid) == (
        JobStateValues.PENDING,
        ("pacs",),
        STUDY,
    )


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
    return db.route_series(SERIES, [PlannedJob("ct-tissue", "r", destinations)])[0]


def test_job_lifecycle_to_delivered(db: StateDB) -> None:
    job_id = _job(db, ["a", "b"])
    db.mark_job_queued(job_id, "task-1")
    db.mark_job_running(job_id)
    files = {"a": [Path("/r/seg-binary.dcm"), Path("/r/sr.dcm")], "b": [Path("/r/sr.dcm")]}
    assert db.record_results(job_id, {"status": "ok"}, files)
    assert not db.record_results(job_id, {"status": "ok"}, files)  # a redelivered task
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


def test_failed_delivery_fails_the_job_with_reason_and_retry_resets(db: StateDB) -> None:
    job_id = _job(db, ["pacs"])
    db.mark_job_queued(job_id, "task-1")
    db.record_results(job_id, {"status": "ok"}, {"pacs": [Path("/r/seg.dcm")]})
    (delivery,) = db.deliveries(job_id)
    db.mark_delivery_failed(delivery.id, "association permanently rejected")
    job = db.job(job_id)
    assert job is not None
    assert job.state == JobStateValues.FAILED
    assert job.reason == "delivery failed: pacs: association permanently rejected"
    assert db.deliveries(job_id)[0].state == DeliveryStateValues.FAILED

    retried = db.retry_job(job_id)
    assert (retried.state, retried.reason, retried.attempts) == (JobStateValues.PENDING, None, 0)
    assert db.deliveries(job_id) == []


def test_retry_refuses_unknown_and_running_jobs(db: StateDB) -> None:
    with pytest.raises(KeyError, match="there is no job 42"):
        db.retry_job(42)
    job_id = _job(db, [])
    db.mark_job_queued(job_id, "task-1")
    with pytest.raises(ValueError, match=f"job {job_id} is queued; only failed or delivered"):
        db.retry_job(job_id)


def test_job_without_destinations_is_done_when_results_are_in(db: StateDB) -> None:
    job_id = _job(db, [])
    db.mark_job_queued(job_id, "task-1")
    db.record_results(job_id, {"status": "ok"}, {})
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
            PlannedJob("ct-tissue", "r", ["pacs"]),
            PlannedJob("mr-model", "r", ["pacs"], skipped_reason="modality CT, the model takes MR"),
        ],
    )
    assert len(ids) == 1
    states = {(job.model, job.state, job.reason) for job in db.jobs()}
    assert states == {
        ("ct-tissue", JobStateValues.PENDING, None),
        ("mr-model", JobStateValues.SKIPPED, "modality CT, the model takes MR"),
    }

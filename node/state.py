"""The state DB: one SQLite file (WAL) that records every step of every study.

Only the node process (and the CLI on the node host) writes it; workers never touch it.
Each public method is one transaction, so a crash between two calls leaves a state the
node can resume from (see :meth:`StateDB.recover`).
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "Delivery",
    "DeliveryStateValues",
    "Job",
    "JobStateValues",
    "PlannedJob",
    "SeriesPlan",
    "SeriesRecord",
    "SeriesStateValues",
    "StateDB",
]


class SeriesStateValues(enum.StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    ROUTED = "routed"
    IGNORED = "ignored"


class JobStateValues(enum.StrEnum):
    PENDING = "pending"  # created, not yet handed to Celery
    QUEUED = "queued"
    RUNNING = "running"
    RESULTS_READY = "results_ready"
    DELIVERED = "delivered"
    FAILED = "failed"
    SKIPPED = "skipped"  # the model does not take this series; reason says why


class DeliveryStateValues(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    calling_ae_title TEXT NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    late_instances INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    received_at REAL NOT NULL,
    late INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (series_instance_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    model TEXT NOT NULL,
    rule TEXT NOT NULL,
    destinations TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    task_id TEXT,
    dispatched_at REAL,
    result TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (series_instance_uid, model)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    created_at REAL NOT NULL,
    reason TEXT,
    UNIQUE (job_id, destination, path)
);
"""


class PlannedJob(NamedTuple):
    """A job routing decided on: which model, chosen by which rules, sending where."""

    model: str
    rule: str
    destinations: Sequence[str]
    skipped_reason: str | None = None


class SeriesPlan(NamedTuple):
    """Routing's decision for one series: its jobs, or why it is ignored (no jobs)."""

    jobs: Sequence[PlannedJob]
    ignored_reason: str | None = None


@dataclass(frozen=True)
class SeriesRecord:
    series_instance_uid: str
    study_instance_uid: str
    calling_ae_title: str
    first_received: float
    last_received: float
    late_instances: int
    state: SeriesStateValues
    reason: str | None


@dataclass(frozen=True)
class Job:
    id: int
    series_instance_uid: str
    study_instance_uid: str
    model: str
    rule: str
    destinations: tuple[str, ...]
    state: JobStateValues
    reason: str | None
    attempts: int
    task_id: str | None
    dispatched_at: float | None
    result: dict[str, Any] | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Delivery:
    id: int
    job_id: int
    destination: str
    path: Path
    state: DeliveryStateValues
    attempts: int
    next_attempt_at: float
    created_at: float
    reason: str | None


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        series_instance_uid=row["series_instance_uid"],
        study_instance_uid=row["study_instance_uid"],
        model=row["model"],
        rule=row["rule"],
        destinations=tuple(json.loads(row["destinations"])),
        state=JobStateValues(row["state"]),
        reason=row["reason"],
        attempts=row["attempts"],
        task_id=row["task_id"],
        dispatched_at=row["dispatched_at"],
        result=json.loads(row["result"]) if row["result"] else None,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        id=row["id"],
        job_id=row["job_id"],
        destination=row["destination"],
        path=Path(row["path"]),
        state=DeliveryStateValues(row["state"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        reason=row["reason"],
    )


def _series(row: sqlite3.Row) -> SeriesRecord:
    return SeriesRecord(
        series_instance_uid=row["series_instance_uid"],
        study_instance_uid=row["study_instance_uid"],
        calling_ae_title=row["calling_ae_title"],
        first_received=row["first_received"],
        last_received=row["last_received"],
        late_instances=row["late_instances"],
        state=SeriesStateValues(row["state"]),
        reason=row["reason"],
    )


class StateDB:
    """Typed access to the state DB; safe to share between the node's threads.

    Parameters
    ----------
    path
        The SQLite file; created with its schema if missing.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        # A SIGKILL never loses a committed transaction in WAL mode with NORMAL; a power
        # cut may lose the last ones, and start-up rescans the spool for exactly that case.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._conn.executescript(_SCHEMA)  # idempotent; executescript commits itself

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params))

    # -- receiving --------------------------------------------------------------------

    def record_instance(
        self,
        *,
        sop_instance_uid: str,
        sop_class_uid: str,
        series_instance_uid: str,
        study_instance_uid: str,
        calling_ae_title: str,
        path: Path,
        received_at: float | None = None,
    ) -> bool:
        """Record an instance written to the spool; returns True if it arrived late.

        An instance is late when its series was already complete; it is kept and counted.
        """
        now = time.time() if received_at is None else received_at
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT state FROM series WHERE series_instance_uid = ?",
                (series_instance_uid,),
            ).fetchone()
            late = row is not None and row["state"] != SeriesStateValues.RECEIVING
            if row is None:
                conn.execute(
                    "INSERT INTO series (series_instance_uid, study_instance_uid, "
                    "calling_ae_title, first_received, last_received, state) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        series_instance_uid,
                        study_instance_uid,
                        calling_ae_title,
                        now,
                        now,
                        SeriesStateValues.RECEIVING,
                    ),
                )
            else:
                conn.execute(
                    "UPDATE series SET last_received = MAX(last_received, ?), "
                    "late_instances = late_instances + ? WHERE series_instance_uid = ?",
                    (now, int(late), series_instance_uid),
                )
            conn.execute(
                "INSERT OR REPLACE INTO instances (sop_instance_uid, series_instance_uid, "
                "sop_class_uid, path, received_at, late) VALUES (?, ?, ?, ?, ?, ?)",
                (sop_instance_uid, series_instance_uid, sop_class_uid, str(path), now, int(late)),
            )
        return bool(late)

    def known_instance_paths(self) -> set[str]:
        return {row["path"] for row in self._query("SELECT path FROM instances")}

    def instance_paths(self, series_instance_uid: str) -> list[Path]:
        rows = self._query(
            "SELECT path FROM instances WHERE series_instance_uid = ? AND late = 0 ORDER BY path",
            (series_instance_uid,),
        )
        return [Path(row["path"]) for row in rows]

    def instance_count(self, series_instance_uid: str) -> int:
        return len(self.instance_paths(series_instance_uid))

    # -- completeness and routing --------------------------------------------------------

    def series(self, series_instance_uid: str) -> SeriesRecord | None:
        rows = self._query(
            "SELECT * FROM series WHERE series_instance_uid = ?", (series_instance_uid,)
        )
        return _series(rows[0]) if rows else None

    def series_quiet_since(self, cutoff: float) -> list[SeriesRecord]:
        """Series still receiving whose last instance arrived before ``cutoff``."""
        rows = self._query(
            "SELECT * FROM series WHERE state = ? AND last_received < ? ORDER BY last_received",
            (SeriesStateValues.RECEIVING, cutoff),
        )
        return [_series(row) for row in rows]

    def series_in_state(self, state: SeriesStateValues) -> list[SeriesRecord]:
        rows = self._query("SELECT * FROM series WHERE state = ?", (state,))
        return [_series(row) for row in rows]

    def mark_series_complete(self, series_instance_uid: str) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE series SET state = ? WHERE series_instance_uid = ? AND state = ?",
                (SeriesStateValues.COMPLETE, series_instance_uid, SeriesStateValues.RECEIVING),
            )

    def route_series(
        self, series_instance_uid: str, jobs: Sequence[PlannedJob], reason: str | None = None
    ) -> list[int]:
        """:meth:`route_study` for a single series."""
        return self.route_study({series_instance_uid: SeriesPlan(jobs, reason)})

    def route_study(self, plans: dict[str, SeriesPlan]) -> list[int]:
        """Close routing of complete series (one study): create their jobs.

        A planned job with a ``skipped_reason`` is recorded as skipped with that reason;
        a series without jobs is recorded as ignored with its reason. Returns the ids of
        the jobs created to run. One transaction, so a crash never leaves a study half
        routed; series no longer complete are left alone.
        """
        now = time.time()
        ids: list[int] = []
        with self._transaction() as conn:
            for series_instance_uid, plan in plans.items():
                row = conn.execute(
                    "SELECT study_instance_uid, state FROM series WHERE series_instance_uid = ?",
                    (series_instance_uid,),
                ).fetchone()
                if row is None or row["state"] != SeriesStateValues.COMPLETE:
                    continue
                for job in plan.jobs:
                    runs = job.skipped_reason is None
                    cursor = conn.execute(
                        "INSERT OR IGNORE INTO jobs (series_instance_uid, study_instance_uid, "
                        "model, rule, destinations, state, reason, created_at, updated_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            series_instance_uid,
                            row["study_instance_uid"],
                            job.model,
                            job.rule,
                            json.dumps(list(job.destinations)),
                            JobStateValues.PENDING if runs else JobStateValues.SKIPPED,
                            job.skipped_reason,
                            now,
                            now,
                        ),
                    )
                    if runs and cursor.rowcount and cursor.lastrowid is not None:
                        ids.append(cursor.lastrowid)
                state = SeriesStateValues.ROUTED if plan.jobs else SeriesStateValues.IGNORED
                conn.execute(
                    "UPDATE series SET state = ?, reason = ? WHERE series_instance_uid = ?",
                    (state, plan.ignored_reason, series_instance_uid),
                )
        return ids

    # -- jobs ------------------------------------------------------------------------------

    def job(self, job_id: int) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self, states: Sequence[JobStateValues] | None = None) -> list[Job]:
        if states is None:
            rows = self._query("SELECT * FROM jobs ORDER BY id")
        else:
            marks = ", ".join("?" for _ in states)
            rows = self._query(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", [*states]
            )
        return [_job(row) for row in rows]

    def _set_job(self, conn: sqlite3.Connection, job_id: int, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*fields.values(), job_id])

    def mark_job_queued(self, job_id: int, task_id: str) -> None:
        with self._transaction() as conn:
            self._set_job(
                conn,
                job_id,
                state=JobStateValues.QUEUED,
                task_id=task_id,
                dispatched_at=time.time(),
                reason=None,
            )
            conn.execute("UPDATE jobs SET attempts = attempts + 1 WHERE id = ?", (job_id,))

    def mark_job_running(self, job_id: int) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE id = ? AND state = ?",
                (JobStateValues.RUNNING, time.time(), job_id, JobStateValues.QUEUED),
            )

    def mark_job_failed(self, job_id: int, reason: str) -> None:
        with self._transaction() as conn:
            self._set_job(conn, job_id, state=JobStateValues.FAILED, reason=reason)

    def mark_job_pending(self, job_id: int, reason: str | None = None) -> None:
        """Put a job back in line for dispatch (recovery, timeouts)."""
        with self._transaction() as conn:
            self._set_job(conn, job_id, state=JobStateValues.PENDING, task_id=None, reason=reason)

    def record_results(
        self, job_id: int, result: dict[str, Any], deliveries: Mapping[str, Sequence[Path]]
    ) -> bool:
        """Store a job's results and queue one delivery per (destination, file) in
        ``deliveries``; a job with nothing to deliver is delivered at once.

        Returns False (and changes nothing) if the job already has its results, which
        happens when a redelivered task finishes twice.
        """
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] not in (
                JobStateValues.QUEUED,
                JobStateValues.RUNNING,
                JobStateValues.PENDING,
            ):
                return False
            queued = 0
            for destination, paths in deliveries.items():
                for path in paths:
                    conn.execute(
                        "INSERT OR IGNORE INTO deliveries (job_id, destination, path, state, "
                        "next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (job_id, destination, str(path), DeliveryStateValues.PENDING, now, now),
                    )
                    queued += 1
            state = JobStateValues.RESULTS_READY if queued else JobStateValues.DELIVERED
            self._set_job(conn, job_id, state=state, result=json.dumps(result), reason=None)
        return True

    def retry_job(self, job_id: int) -> Job:
        """Send a failed (or finished) job through the whole path again.

        Raises
        ------
        KeyError
            If there is no job with that id.
        ValueError
            If the job is still in progress.
        """
        with self._transaction() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(f"there is no job {job_id}")
            if row["state"] not in (JobStateValues.FAILED, JobStateValues.DELIVERED):
                raise ValueError(
                    f"job {job_id} is {row['state']}; only failed or delivered jobs can be retried"
                )
            conn.execute("DELETE FROM deliveries WHERE job_id = ?", (job_id,))
            self._set_job(
                conn,
                job_id,
                state=JobStateValues.PENDING,
                reason=None,
                task_id=None,
                result=None,
                attempts=0,
            )
        job = self.job(job_id)
        assert job is not None
        return job

    # -- deliveries ------------------------------------------------------------------------

    def due_deliveries(self, now: float) -> list[Delivery]:
        rows = self._query(
            "SELECT * FROM deliveries WHERE state = ? AND next_attempt_at <= ? ORDER BY id",
            (DeliveryStateValues.PENDING, now),
        )
        return [_delivery(row) for row in rows]

    def deliveries(self, job_id: int) -> list[Delivery]:
        rows = self._query("SELECT * FROM deliveries WHERE job_id = ? ORDER BY id", (job_id,))
        return [_delivery(row) for row in rows]

    def mark_delivery_done(self, delivery_id: int) -> None:
        self._finish_delivery(delivery_id, DeliveryStateValues.DELIVERED, None)

    def mark_delivery_failed(self, delivery_id: int, reason: str) -> None:
        self._finish_delivery(delivery_id, DeliveryStateValues.FAILED, reason)

    def postpone_delivery(self, delivery_id: int, next_attempt_at: float, reason: str) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?, reason = ? "
                "WHERE id = ?",
                (next_attempt_at, reason, delivery_id),
            )

    def _finish_delivery(
        self, delivery_id: int, state: DeliveryStateValues, reason: str | None
    ) -> None:
        """Close one delivery, and its job once every delivery of the job is closed."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE deliveries SET state = ?, reason = ?, attempts = attempts + 1 WHERE id = ?",
                (state, reason, delivery_id),
            )
            job_id = conn.execute(
                "SELECT job_id FROM deliveries WHERE id = ?", (delivery_id,)
            ).fetchone()["job_id"]
            rows = conn.execute(
                "SELECT destination, state, reason FROM deliveries WHERE job_id = ?", (job_id,)
            ).fetchall()
            if any(r["state"] == DeliveryStateValues.PENDING for r in rows):
                return
            failed = sorted(
                {f"{r['destination']}: {r['reason']}" for r in rows if r["state"] == "failed"}
            )
            if failed:
                self._set_job(
                    conn,
                    job_id,
                    state=JobStateValues.FAILED,
                    reason="delivery failed: " + "; ".join(failed),
                )
            else:
                self._set_job(conn, job_id, state=JobStateValues.DELIVERED)

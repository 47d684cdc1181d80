"""The state DB: one SQLite file (WAL) that records every step of every study.

Only the node process (and the CLI on the node host) writes it; workers never touch it.
Each public method is one transaction, so a crash between two calls leaves a state the
node can resume from (start-up: :func:`node.app.recover_spool` and
:meth:`node.dispatch.Dispatcher.requeue_unfinished`).

It holds each instance's file and digest, and each job's manifest: the instances it
runs on, fixed when routing creates it. Jobs of one lineage (a model on a study, or on
a series for per-image models) are the versions of that model's results; a new one is
created only when its input differs from the latest one's (:meth:`StateDB.route_study`).
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from workers.contract import InputSeries, JobOutcome, JobRequest, Manifest, ManifestInstance

__all__ = [
    "IN_PROGRESS_JOB_STATES",
    "RETRYABLE_JOB_STATES",
    "SCHEMA_VERSION",
    "Delivery",
    "DeliveryAttempt",
    "DeliveryStateValues",
    "Job",
    "JobInFlight",
    "JobStateValues",
    "PlannedJob",
    "Receipt",
    "ReceiptValues",
    "SeriesPlan",
    "SeriesRecord",
    "SeriesStateValues",
    "StateDB",
    "StateDBError",
    "StudyActivity",
    "StudyInfo",
]

#: Bumped whenever the tables change; a DB of another version is refused at start.
SCHEMA_VERSION = 6


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
    SUPERSEDED = "superseded"  # newer input arrived before it ran; superseded_by runs instead
    KEPT = "kept"  # shadow mode: results written and kept, nothing sent
    CANCELLED = "cancelled"  # an admin stopped it; results that still come are dropped


#: Jobs that may still produce results.
UNSETTLED_JOB_STATES = (JobStateValues.PENDING, JobStateValues.QUEUED, JobStateValues.RUNNING)
#: Jobs on their way: they may still produce or send results (and can be cancelled).
IN_PROGRESS_JOB_STATES = (*UNSETTLED_JOB_STATES, JobStateValues.RESULTS_READY)
#: Jobs :meth:`StateDB.retry_job` runs again.
RETRYABLE_JOB_STATES = (
    JobStateValues.FAILED,
    JobStateValues.CANCELLED,
    JobStateValues.DELIVERED,
    JobStateValues.KEPT,
)


class ReceiptValues(enum.StrEnum):
    """What receiving an instance meant for its series."""

    NEW = "new"  # a SOP Instance UID not seen before
    DUPLICATE = "duplicate"  # the same UID with the same bytes: nothing to do
    CHANGED = "changed"  # the same UID with other bytes: the stored instance is replaced


class DeliveryStateValues(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


#: Add a study's jobs and delivery attempts to ``removed_totals`` (retention).
_REMOVED_TOTALS = tuple(
    "INSERT INTO removed_totals (metric, first, second, count) " + select + " GROUP BY 2, 3 "
    "ON CONFLICT (metric, first, second) DO UPDATE SET count = count + excluded.count"
    for select in (
        "SELECT 'jobs', model, state, COUNT(*) FROM jobs WHERE study_instance_uid = ?",
        (
            "SELECT 'delivery_attempts', d.destination, a.outcome, COUNT(*) FROM "
            "delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id "
            "JOIN jobs j ON j.id = d.job_id WHERE j.study_instance_uid = ?"
        ),
    )
)

#: Changes that bring a DB of an older schema to :data:`SCHEMA_VERSION` in place.
_MIGRATIONS = {
    3: (
        "ALTER TABLE instances ADD COLUMN geometry TEXT",
        "ALTER TABLE series ADD COLUMN completed_at REAL",
        "ALTER TABLE series ADD COLUMN routed_at REAL",
        "ALTER TABLE jobs ADD COLUMN started_at REAL",
        "ALTER TABLE jobs ADD COLUMN results_at REAL",
        "ALTER TABLE deliveries ADD COLUMN last_attempt_at REAL",
        "ALTER TABLE deliveries ADD COLUMN delivered_at REAL",
    ),
    4: (
        # Studies received before schema 5 are listed without patient and study details.
        (
            "CREATE TABLE studies (study_instance_uid TEXT PRIMARY KEY, patient_id TEXT, "
            "patient_name TEXT, accession_number TEXT, study_date TEXT, "
            "study_description TEXT, first_received REAL NOT NULL)"
        ),
        (
            "INSERT INTO studies (study_instance_uid, first_received) SELECT "
            "study_instance_uid, MIN(first_received) FROM series GROUP BY study_instance_uid"
        ),
    ),
    5: ("ALTER TABLE deliveries ADD COLUMN sending_since REAL",),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    calling_ae_title TEXT NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    late_instances INTEGER NOT NULL DEFAULT 0,
    reopened INTEGER NOT NULL DEFAULT 0,
    gap_waits INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    reason TEXT,
    completed_at REAL,  -- last time it fell quiet (or its peer released)
    routed_at REAL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    received_at REAL NOT NULL,
    late INTEGER NOT NULL DEFAULT 0,
    geometry TEXT  -- node.completeness.encode_geometry; NULL: not recorded (schema 3)
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (series_instance_uid);
CREATE INDEX IF NOT EXISTS instances_by_time ON instances (received_at);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    patient_id TEXT,  -- as the first instance of the study carried them
    patient_name TEXT,
    accession_number TEXT,
    study_date TEXT,  -- YYYYMMDD
    study_description TEXT,
    first_received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_by_time ON studies (first_received);
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
    lineage TEXT NOT NULL,
    manifest TEXT,
    manifest_digest TEXT,
    revision INTEGER,
    predecessor_id INTEGER REFERENCES jobs (id),
    superseded_by INTEGER REFERENCES jobs (id),
    request TEXT,
    shadow INTEGER NOT NULL DEFAULT 0,
    started_at REAL,  -- the broker reported it started
    results_at REAL  -- its results were recorded
);
CREATE INDEX IF NOT EXISTS jobs_by_lineage ON jobs (lineage, id);
CREATE INDEX IF NOT EXISTS jobs_by_series ON jobs (series_instance_uid, model);
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
    last_attempt_at REAL,
    delivered_at REAL,
    sending_since REAL,  -- set while a C-STORE of the file is under way
    UNIQUE (job_id, destination, path)
);
CREATE TABLE IF NOT EXISTS delivery_attempts (
    delivery_id INTEGER NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    at REAL NOT NULL,
    outcome TEXT NOT NULL,  -- delivered, failed (for good) or retry
    reason TEXT
);
CREATE INDEX IF NOT EXISTS attempts_by_delivery ON delivery_attempts (delivery_id);
-- What retention removed, so that /metrics' counters never go down: the jobs by (model,
-- final state) and the delivery attempts by (destination, outcome) of removed studies.
CREATE TABLE IF NOT EXISTS removed_totals (
    metric TEXT NOT NULL,  -- jobs or delivery_attempts
    first TEXT NOT NULL,
    second TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (metric, first, second)
);
CREATE INDEX IF NOT EXISTS series_by_study ON series (study_instance_uid);
CREATE INDEX IF NOT EXISTS jobs_by_study ON jobs (study_instance_uid);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE INDEX IF NOT EXISTS deliveries_by_job ON deliveries (job_id);
CREATE INDEX IF NOT EXISTS deliveries_by_state ON deliveries (state, next_attempt_at);
"""


_LATEST_VERSION = "SELECT * FROM jobs WHERE lineage = ? AND state != ? ORDER BY id DESC LIMIT 1"


class StateDBError(Exception):
    """The state DB cannot be used by this version of pacsnode; the message says why."""


class PlannedJob(NamedTuple):
    """A job routing decided on: which model, chosen by which rules, sending where.

    ``lineage`` names the line of versions the job belongs to (its results replace the
    previous job of the same lineage); ``failed_reason`` creates the job failed (its
    input is unusable, e.g. a slice is missing).
    """

    model: str
    rule: str
    destinations: Sequence[str]
    skipped_reason: str | None = None
    lineage: str = ""
    failed_reason: str | None = None
    shadow: bool = False
    #: A multi-series model's other inputs: (input name, series UID); the job's own
    #: series is its reference input, named by ``reference_input``.
    other_inputs: tuple[tuple[str, str], ...] = ()
    reference_input: str | None = None


class SeriesPlan(NamedTuple):
    """Routing's decision for one series: its jobs, or why it is ignored (no jobs)."""

    jobs: Sequence[PlannedJob]
    ignored_reason: str | None = None


class StudyInfo(NamedTuple):
    """What the console lists a study by, as its first instance carried it."""

    patient_id: str = ""
    patient_name: str = ""
    accession_number: str = ""
    study_date: str = ""  # YYYYMMDD
    study_description: str = ""


@dataclass(frozen=True)
class StudyActivity:
    """What retention needs to know of a study (:mod:`node.retention`)."""

    study_instance_uid: str
    #: Its last activity: an instance received, a job or a delivery settled.
    idle_since: float
    #: A series receiving or waiting for routing, a job not finished, a delivery pending.
    busy: bool
    #: failed: a job (not replaced) failed or was cancelled; delivered: a job was
    #: delivered (or kept, in shadow mode); ignored: no model ran on it.
    outcome: str
    has_inputs: bool
    #: Jobs that wrote results.
    job_ids: tuple[int, ...]


#: Every study's activity, or one study's (``{where}``: a filter on study_instance_uid).
_STUDY_ACTIVITY = """
WITH s AS (SELECT study_instance_uid AS uid, MAX(last_received) AS last,
                  SUM(state IN ('receiving', 'complete')) AS open
           FROM series {where} GROUP BY 1),
     j AS (SELECT study_instance_uid AS uid, MAX(updated_at) AS last,
                  SUM(state IN ('pending', 'queued', 'running', 'results_ready')) AS busy,
                  SUM(state IN ('failed', 'cancelled') AND superseded_by IS NULL) AS failed,
                  SUM(state IN ('delivered', 'kept')) AS done,
                  GROUP_CONCAT(CASE WHEN result IS NOT NULL THEN id END) AS with_results
           FROM jobs {where} GROUP BY 1),
     d AS (SELECT j.study_instance_uid AS uid,
                  MAX(COALESCE(d.last_attempt_at, d.created_at)) AS last,
                  SUM(d.state = 'pending') AS pending
           FROM deliveries d JOIN jobs j ON j.id = d.job_id {where_jobs} GROUP BY 1),
     i AS (SELECT s.study_instance_uid AS uid, COUNT(*) AS n
           FROM instances i JOIN series s USING (series_instance_uid) {where_series} GROUP BY 1)
SELECT s.uid, MAX(s.last, COALESCE(j.last, 0), COALESCE(d.last, 0)) AS idle_since,
       s.open + COALESCE(j.busy, 0) + COALESCE(d.pending, 0) AS busy,
       COALESCE(j.failed, 0) AS failed, COALESCE(j.done, 0) AS done, j.with_results,
       COALESCE(i.n, 0) AS instances
FROM s LEFT JOIN j USING (uid) LEFT JOIN d USING (uid) LEFT JOIN i USING (uid)
ORDER BY idle_since
"""


def _study_activity(row: sqlite3.Row) -> StudyActivity:
    outcome = "failed" if row["failed"] else "delivered" if row["done"] else "ignored"
    with_results = row["with_results"]
    return StudyActivity(
        study_instance_uid=row["uid"],
        idle_since=row["idle_since"],
        busy=bool(row["busy"]),
        outcome=outcome,
        has_inputs=bool(row["instances"]),
        job_ids=tuple(int(i) for i in with_results.split(",")) if with_results else (),
    )


@dataclass(frozen=True)
class Receipt:
    """What :meth:`StateDB.record_instance` made of an instance.

    ``late``: its series had completed before it came; ``reopened``: the series is
    receiving again because of it (``completion.late: rerun``), so it will be routed
    again.
    """

    kind: ReceiptValues
    late: bool = False
    reopened: bool = False


@dataclass(frozen=True)
class SeriesRecord:
    series_instance_uid: str
    study_instance_uid: str
    calling_ae_title: str
    first_received: float
    last_received: float
    late_instances: int
    reopened: int
    gap_waits: int
    state: SeriesStateValues
    reason: str | None
    completed_at: float | None = None
    routed_at: float | None = None


@dataclass(frozen=True)
class JobInFlight:
    """A queued or running job as the collector polls it."""

    id: int
    state: JobStateValues
    task_id: str | None
    dispatched_at: float | None
    started_at: float | None = None


@dataclass(frozen=True)
class Job:
    """One run of a model on one manifest. Jobs of one lineage are the versions of a
    model's results for a study (or, for per-image models, a series)."""

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
    result: JobOutcome | None
    created_at: float
    updated_at: float
    lineage: str
    manifest: Manifest | None
    revision: int | None
    predecessor_id: int | None
    superseded_by: int | None
    request: JobRequest | None
    shadow: bool
    started_at: float | None = None
    results_at: float | None = None

    @property
    def source_paths(self) -> list[Path]:
        """The files of the job's input, in the manifest's order."""
        return [Path(i.path) for i in self.manifest.instances] if self.manifest else []


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
    last_attempt_at: float | None = None
    delivered_at: float | None = None
    #: When the C-STORE now under way began; set after a crash mid-send until start-up.
    sending_since: float | None = None


class DeliveryAttempt(NamedTuple):
    """One try to send a delivery's file."""

    at: float
    outcome: str  # delivered, failed (for good) or retry
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
        result=JobOutcome.model_validate_json(row["result"]) if row["result"] else None,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        lineage=row["lineage"],
        manifest=Manifest.model_validate_json(row["manifest"]) if row["manifest"] else None,
        revision=row["revision"],
        predecessor_id=row["predecessor_id"],
        superseded_by=row["superseded_by"],
        request=JobRequest.model_validate_json(row["request"]) if row["request"] else None,
        shadow=bool(row["shadow"]),
        started_at=row["started_at"],
        results_at=row["results_at"],
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
        last_attempt_at=row["last_attempt_at"],
        delivered_at=row["delivered_at"],
        sending_since=row["sending_since"],
    )


def _series(row: sqlite3.Row) -> SeriesRecord:
    return SeriesRecord(
        series_instance_uid=row["series_instance_uid"],
        study_instance_uid=row["study_instance_uid"],
        calling_ae_title=row["calling_ae_title"],
        first_received=row["first_received"],
        last_received=row["last_received"],
        late_instances=row["late_instances"],
        reopened=row["reopened"],
        gap_waits=row["gap_waits"],
        state=SeriesStateValues(row["state"]),
        reason=row["reason"],
        completed_at=row["completed_at"],
        routed_at=row["routed_at"],
    )


class StateDB:
    """Typed access to the state DB; safe to share between the node's threads.

    Parameters
    ----------
    path
        The SQLite file; created with its schema if missing (unless ``read_only``).
    read_only
        Open for queries only; nothing is written.

    Raises
    ------
    StateDBError
        If the file was written by a pacsnode with another schema.
    sqlite3.OperationalError
        If ``read_only`` and the file cannot be opened.
    """

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self._lock = threading.RLock()
        if read_only:
            # For commands that only look (pacsnode rules test, jobs): nothing is written,
            # not even the schema, and a missing file is an error.
            self._conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0,
                isolation_level=None, check_same_thread=False,
            )  # fmt: skip
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            tables = self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            while tables and version in _MIGRATIONS and not read_only:
                for step in _MIGRATIONS[version]:
                    self._conn.execute(step)
                version += 1
            if (tables or read_only) and version != SCHEMA_VERSION:
                self._conn.close()
                raise StateDBError(
                    f"{path} was written by a pacsnode with state DB schema {version}; this "
                    f"one needs schema {SCHEMA_VERSION}. Stop the node, move the file aside "
                    "(with its -wal and -shm files) and start again: the spool is recorded "
                    "anew from disk at start, only the job history stays in the old file."
                )
            if read_only:
                return
            self._conn.execute("PRAGMA journal_mode=WAL")
            # A SIGKILL never loses a committed transaction in WAL mode with NORMAL; a power
            # cut may lose the last ones, and start-up rescans the spool for that case.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)  # idempotent; executescript commits itself
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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

    def select(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Rows of a query that only reads, for reports over many tables
        (:mod:`node.overview`, :mod:`node.metrics`)."""
        return self._query(sql, params)

    def writable(self) -> bool:
        """Whether a write transaction can start now (the readiness check)."""
        try:
            with self._lock:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            return False
        return True

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
        size: int,
        sha256: str,
        geometry: str | None = None,
        study: StudyInfo | None = None,
        rerun_late: bool = True,
        received_at: float | None = None,
    ) -> Receipt:
        """Record an instance written to the spool.

        The same SOP Instance UID with the same bytes (``sha256``) is a duplicate and
        changes nothing, except that a series still receiving stays open a little longer.
        Anything else is stored; when its series had already completed, the instance is
        late: with ``rerun_late`` the series is receiving again (it will be routed again
        and a job whose input changed runs as a new version), otherwise the instance is
        kept, counted in ``late_instances`` and left out of the series. ``geometry`` is
        what the slice-gap check needs of it (:func:`node.completeness.encode_geometry`;
        None: not known, the check reads the file). ``study`` is recorded with the
        study's first series.
        """
        now = time.time() if received_at is None else received_at
        with self._transaction() as conn:
            existing = conn.execute(
                "SELECT series_instance_uid, path, sha256, late FROM instances "
                "WHERE sop_instance_uid = ?",
                (sop_instance_uid,),
            ).fetchone()
            row = conn.execute(
                "SELECT state FROM series WHERE series_instance_uid = ?",
                (series_instance_uid,),
            ).fetchone()
            receiving = row is not None and row["state"] == SeriesStateValues.RECEIVING
            same_series = (
                existing is not None and existing["series_instance_uid"] == series_instance_uid
            )
            if same_series and existing["sha256"] == sha256:
                if receiving:
                    conn.execute(
                        "UPDATE series SET last_received = MAX(last_received, ?) "
                        "WHERE series_instance_uid = ?",
                        (now, series_instance_uid),
                    )
                return Receipt(ReceiptValues.DUPLICATE)
            kind = ReceiptValues.NEW if existing is None else ReceiptValues.CHANGED
            if existing is not None and not same_series:
                # The UID moved to another series: the old series lost a member.
                self._reopen(conn, existing["series_instance_uid"], now, rerun_late)
            late = row is not None and not receiving
            reopened = False
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
                conn.execute(
                    "INSERT OR IGNORE INTO studies (study_instance_uid, patient_id, patient_name, "
                    "accession_number, study_date, study_description, first_received) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (study_instance_uid, *(study or StudyInfo()), now),
                )
            elif late:
                reopened = self._reopen(conn, series_instance_uid, now, rerun_late)
            else:
                conn.execute(
                    "UPDATE series SET last_received = MAX(last_received, ?) "
                    "WHERE series_instance_uid = ?",
                    (now, series_instance_uid),
                )
            # A changed instance keeps its place in (or out of) the series.
            left_out = late and not reopened and not same_series
            if same_series:
                left_out = bool(existing["late"])
            conn.execute(
                "INSERT OR REPLACE INTO instances (sop_instance_uid, series_instance_uid, "
                "sop_class_uid, path, size, sha256, received_at, late, geometry) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sop_instance_uid,
                    series_instance_uid,
                    sop_class_uid,
                    str(path),
                    size,
                    sha256,
                    now,
                    int(left_out),
                    geometry,
                ),
            )
        return Receipt(kind, late=late, reopened=reopened)

    def _reopen(
        self, conn: sqlite3.Connection, series_instance_uid: str, now: float, rerun_late: bool
    ) -> bool:
        """A finished series got new or changed data: receiving again (rerun) or count it
        as late (keep). Returns True if it was reopened."""
        if rerun_late:
            conn.execute(
                "UPDATE series SET state = ?, last_received = ?, reopened = reopened + 1, "
                "reason = NULL WHERE series_instance_uid = ?",
                (SeriesStateValues.RECEIVING, now, series_instance_uid),
            )
            return True
        conn.execute(
            "UPDATE series SET late_instances = late_instances + 1 WHERE series_instance_uid = ?",
            (series_instance_uid,),
        )
        return False

    def known_sop_instance_uids(self) -> set[str]:
        return {row[0] for row in self._query("SELECT sop_instance_uid FROM instances")}

    def instance_paths(self, series_instance_uid: str) -> list[Path]:
        """The files of a series' instances (late ones kept under ``keep`` left out)."""
        return [Path(i.path) for i in self._instances(series_instance_uid)]

    def instance_geometries(self, series_instance_uid: str) -> list[tuple[Path, str | None]]:
        """Each of a series' instances (as :meth:`instance_paths`) with the geometry
        recorded on receipt (None: not recorded)."""
        rows = self._query(
            "SELECT path, geometry FROM instances WHERE series_instance_uid = ? AND late = 0 "
            "ORDER BY path",
            (series_instance_uid,),
        )
        return [(Path(r["path"]), r["geometry"]) for r in rows]

    def instance_count(self, series_instance_uid: str) -> int:
        """How many instances the series has (late ones kept under ``keep`` left out)."""
        rows = self._query(
            "SELECT COUNT(*) FROM instances WHERE series_instance_uid = ? AND late = 0",
            (series_instance_uid,),
        )
        return int(rows[0][0])

    def _instances(
        self, series_instance_uid: str, conn: sqlite3.Connection | None = None
    ) -> list[ManifestInstance]:
        sql = (
            "SELECT sop_instance_uid, path, size, sha256 FROM instances "
            "WHERE series_instance_uid = ? AND late = 0 ORDER BY path"
        )
        with self._lock:
            rows = (conn or self._conn).execute(sql, (series_instance_uid,)).fetchall()
        return [
            ManifestInstance(
                sop_instance_uid=r["sop_instance_uid"],
                path=r["path"],
                size=r["size"],
                sha256=r["sha256"],
            )
            for r in rows
        ]

    def manifest(self, series_instance_uid: str) -> Manifest | None:
        """The series' instances as a job would take them now; None if it has none."""
        instances = self._instances(series_instance_uid)
        if not instances:
            return None
        return Manifest(series_instance_uid=series_instance_uid, instances=tuple(instances))

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

    def next_quiet_deadline(self, quiet_seconds: float) -> float | None:
        """When the first series still receiving falls quiet, if nothing more arrives
        (epoch seconds); None when no series is receiving."""
        rows = self._query(
            "SELECT MIN(last_received) AS first FROM series WHERE state = ?",
            (SeriesStateValues.RECEIVING,),
        )
        first = rows[0]["first"] if rows else None
        return None if first is None else float(first) + quiet_seconds

    def series_of_study(self, study_instance_uid: str) -> list[SeriesRecord]:
        rows = self._query(
            "SELECT * FROM series WHERE study_instance_uid = ? ORDER BY first_received",
            (study_instance_uid,),
        )
        return [_series(row) for row in rows]

    def studies_received_since(self, cutoff: float) -> list[str]:
        """Study Instance UIDs of studies with an instance received at or after ``cutoff``."""
        rows = self._query(
            "SELECT study_instance_uid FROM series GROUP BY study_instance_uid "
            "HAVING MAX(last_received) >= ? ORDER BY MIN(first_received)",
            (cutoff,),
        )
        return [row["study_instance_uid"] for row in rows]

    def series_in_state(self, state: SeriesStateValues) -> list[SeriesRecord]:
        rows = self._query("SELECT * FROM series WHERE state = ?", (state,))
        return [_series(row) for row in rows]

    def mark_series_complete(self, series_instance_uid: str) -> bool:
        """Close a series still receiving; returns False if it was not receiving."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE series SET state = ?, completed_at = ? "
                "WHERE series_instance_uid = ? AND state = ?",
                (
                    SeriesStateValues.COMPLETE,
                    time.time(),
                    series_instance_uid,
                    SeriesStateValues.RECEIVING,
                ),
            )
        return bool(cursor.rowcount)

    def wait_another_quiet_period(self, series_instance_uid: str, reason: str) -> bool:
        """Send a complete series back to receiving once (it looked incomplete, e.g. a
        slice missing); ``gap_waits`` records that it waited. Returns False (and changes
        nothing) if the series is not complete (e.g. already routed)."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE series SET state = ?, last_received = ?, gap_waits = gap_waits + 1, "
                "reason = ? WHERE series_instance_uid = ? AND state = ?",
                (
                    SeriesStateValues.RECEIVING,
                    time.time(),
                    reason,
                    series_instance_uid,
                    SeriesStateValues.COMPLETE,
                ),
            )
        return bool(cursor.rowcount)

    def route_series(
        self, series_instance_uid: str, jobs: Sequence[PlannedJob], reason: str | None = None
    ) -> list[int]:
        """:meth:`route_study` for a single series."""
        return self.route_study({series_instance_uid: SeriesPlan(jobs, reason)})

    def route_study(self, plans: dict[str, SeriesPlan]) -> list[int]:
        """Route the series of one study: create the jobs whose input is new.

        For each planned job that runs, the series' instances now are its manifest.
        If the latest job of the same lineage ran on the same series with the same
        manifest digest, nothing is created (identical input, identical results);
        otherwise a new job is created as the next version, naming the latest as its
        predecessor (which, if it has not been dispatched yet, is superseded and never
        runs). A planned job with a ``skipped_reason`` is recorded as skipped once per
        (series, model); a series without jobs is recorded as ignored with its reason.

        One transaction; if any planned series is receiving again (or unknown), nothing
        is routed and the study waits for its next quiet period. Returns the ids of the
        jobs created to run.
        """
        now = time.time()
        ids: list[int] = []
        with self._transaction() as conn:
            rows = {
                uid: conn.execute(
                    "SELECT study_instance_uid, state FROM series WHERE series_instance_uid = ?",
                    (uid,),
                ).fetchone()
                for uid in plans
            }
            if any(r is None or r["state"] == SeriesStateValues.RECEIVING for r in rows.values()):
                return []
            for series_instance_uid, plan in plans.items():
                study = rows[series_instance_uid]["study_instance_uid"]
                for job in plan.jobs:
                    if job.skipped_reason is not None:
                        self._record_skip(conn, series_instance_uid, study, job, now)
                        continue
                    job_id = self._create_version(conn, series_instance_uid, study, job, now)
                    if job_id is not None and job.failed_reason is None:
                        ids.append(job_id)
                state = SeriesStateValues.ROUTED if plan.jobs else SeriesStateValues.IGNORED
                conn.execute(
                    "UPDATE series SET state = ?, reason = ?, routed_at = ? "
                    "WHERE series_instance_uid = ?",
                    (state, plan.ignored_reason, now, series_instance_uid),
                )
        return ids

    def _record_skip(
        self, conn: sqlite3.Connection, series_uid: str, study_uid: str, job: PlannedJob, now: float
    ) -> None:
        last = conn.execute(
            "SELECT id, state FROM jobs WHERE series_instance_uid = ? AND model = ? "
            "ORDER BY id DESC LIMIT 1",
            (series_uid, job.model),
        ).fetchone()
        if last is not None and last["state"] != JobStateValues.SKIPPED:
            return  # it ran before; a later version on another series replaces it
        if last is not None:
            self._set_job(conn, last["id"], reason=job.skipped_reason)
            return
        conn.execute(
            "INSERT INTO jobs (series_instance_uid, study_instance_uid, model, rule, "
            "destinations, state, reason, created_at, updated_at, lineage) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                series_uid,
                study_uid,
                job.model,
                job.rule,
                json.dumps(list(job.destinations)),
                JobStateValues.SKIPPED,
                job.skipped_reason,
                now,
                now,
                job.lineage,
            ),
        )

    def _create_version(
        self, conn: sqlite3.Connection, series_uid: str, study_uid: str, job: PlannedJob, now: float
    ) -> int | None:
        """The job for ``job`` on the series' current instances, unless the lineage's
        latest job already has exactly that input."""
        instances = self._instances(series_uid, conn)
        others = [
            InputSeries(name=name, series_instance_uid=uid, instances=tuple(found))
            for name, uid in job.other_inputs
            if (found := self._instances(uid, conn))
        ]
        if not instances or len(others) != len(job.other_inputs):
            return None
        manifest = Manifest(
            series_instance_uid=series_uid,
            instances=tuple(instances),
            reference_input=job.reference_input,
            other_inputs=tuple(others),
        )
        digest = manifest.digest
        latest = conn.execute(_LATEST_VERSION, (job.lineage, JobStateValues.SKIPPED)).fetchone()
        if (
            latest is not None
            and latest["series_instance_uid"] == series_uid
            and latest["manifest_digest"] == digest
        ):
            return None
        conn.execute(
            "DELETE FROM jobs WHERE series_instance_uid = ? AND model = ? AND state = ?",
            (series_uid, job.model, JobStateValues.SKIPPED),
        )
        cursor = conn.execute(
            "INSERT INTO jobs (series_instance_uid, study_instance_uid, model, rule, "
            "destinations, state, reason, created_at, updated_at, lineage, manifest, "
            "manifest_digest, predecessor_id, shadow) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                series_uid,
                study_uid,
                job.model,
                job.rule,
                json.dumps(list(job.destinations)),
                JobStateValues.PENDING if job.failed_reason is None else JobStateValues.FAILED,
                job.failed_reason,
                now,
                now,
                job.lineage,
                manifest.model_dump_json(),
                digest,
                latest["id"] if latest is not None else None,
                int(job.shadow),
            ),
        )
        job_id = cursor.lastrowid
        assert job_id is not None
        if latest is not None:
            superseded: dict[str, Any] = {"superseded_by": job_id}
            if latest["state"] == JobStateValues.PENDING:
                superseded["state"] = JobStateValues.SUPERSEDED
                superseded["reason"] = f"newer input before it ran; job {job_id} runs instead"
            self._set_job(conn, latest["id"], **superseded)
        return job_id

    # -- jobs ------------------------------------------------------------------------------

    def job(self, job_id: int) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs_in_flight(self) -> list[JobInFlight]:
        """Queued and running jobs, without their manifests and requests (read often)."""
        rows = self._query(
            "SELECT id, state, task_id, dispatched_at, started_at FROM jobs "
            "WHERE state IN (?, ?) ORDER BY id",
            (JobStateValues.QUEUED, JobStateValues.RUNNING),
        )
        return [
            JobInFlight(
                row["id"],
                JobStateValues(row["state"]),
                row["task_id"],
                row["dispatched_at"],
                row["started_at"],
            )
            for row in rows
        ]

    def jobs(
        self,
        states: Sequence[JobStateValues] | None = None,
        *,
        since: float | None = None,
        study_instance_uid: str | None = None,
    ) -> list[Job]:
        """Jobs in id order: in one of ``states``, created at or after ``since`` (epoch
        seconds), of one study (each filter only when given)."""
        where: list[str] = []
        params: list[Any] = []
        if states is not None:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            params += states
        if since is not None:
            where.append("created_at >= ?")
            params.append(since)
        if study_instance_uid is not None:
            where.append("study_instance_uid = ?")
            params.append(study_instance_uid)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        return [_job(row) for row in self._query(f"SELECT * FROM jobs{clause} ORDER BY id", params)]

    def latest_version(self, lineage: str) -> Job | None:
        """The newest job of a lineage that is not a skip."""
        rows = self._query(_LATEST_VERSION, (lineage, JobStateValues.SKIPPED))
        return _job(rows[0]) if rows else None

    def earlier_version_unsettled(self, job: Job) -> bool:
        """Whether an earlier job of ``job``'s lineage may still produce results."""
        marks = ", ".join("?" for _ in UNSETTLED_JOB_STATES)
        rows = self._query(
            f"SELECT 1 FROM jobs WHERE lineage = ? AND id < ? AND state IN ({marks}) LIMIT 1",
            (job.lineage, job.id, *UNSETTLED_JOB_STATES),
        )
        return bool(rows)

    def previous_results(self, job: Job) -> Job | None:
        """The latest earlier job of ``job``'s lineage that produced results: the
        version ``job`` replaces. Shadow results were never sent, so a live job does not
        replace them (nor a shadow job live ones)."""
        rows = self._query(
            "SELECT * FROM jobs WHERE lineage = ? AND id < ? AND result IS NOT NULL "
            "AND shadow = ? ORDER BY id DESC LIMIT 1",
            (job.lineage, job.id, int(job.shadow)),
        )
        return _job(rows[0]) if rows else None

    def _set_job(self, conn: sqlite3.Connection, job_id: int, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*fields.values(), job_id])

    def mark_job_queued(self, job_id: int, task_id: str, request: JobRequest) -> None:
        """The job was handed to Celery with ``request``, which is stored as sent."""
        with self._transaction() as conn:
            self._set_job(
                conn,
                job_id,
                state=JobStateValues.QUEUED,
                task_id=task_id,
                dispatched_at=time.time(),
                reason=None,
                revision=request.revision,
                request=request.model_dump_json(),
            )
            conn.execute("UPDATE jobs SET attempts = attempts + 1 WHERE id = ?", (job_id,))

    def mark_job_running(self, job_id: int) -> None:
        with self._transaction() as conn:
            now = time.time()
            conn.execute(
                "UPDATE jobs SET state = ?, updated_at = ?, started_at = ? WHERE id = ? AND state = ?",
                (JobStateValues.RUNNING, now, now, job_id, JobStateValues.QUEUED),
            )

    def mark_job_failed(self, job_id: int, reason: str) -> None:
        with self._transaction() as conn:
            self._set_job(conn, job_id, state=JobStateValues.FAILED, reason=reason)

    def mark_job_pending(
        self, job_id: int, reason: str | None = None, *, never_started: bool = False
    ) -> None:
        """Put a job back in line for dispatch (recovery, timeouts); a job a newer
        version has replaced is superseded instead, as it would only be withdrawn.

        A job that ``never_started`` (queued when its worker was lost) gets back the
        attempt its dispatch counted: only runs count towards ``worker.max_attempts``,
        or a few worker restarts would fail jobs that waited in the queue.
        """
        with self._transaction() as conn:
            if never_started:
                conn.execute(
                    "UPDATE jobs SET attempts = MAX(attempts - 1, 0) WHERE id = ?", (job_id,)
                )
            row = conn.execute("SELECT superseded_by FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and row["superseded_by"] is not None:
                self._set_job(
                    conn,
                    job_id,
                    state=JobStateValues.SUPERSEDED,
                    task_id=None,
                    reason=f"{reason}; not run again, job {row['superseded_by']} replaces it",
                )
                return
            self._set_job(conn, job_id, state=JobStateValues.PENDING, task_id=None, reason=reason)

    def record_results(
        self, job_id: int, outcome: JobOutcome, deliveries: Mapping[str, Sequence[Path]]
    ) -> bool:
        """Store a job's results and queue one delivery per (destination, file) in
        ``deliveries``; a job with nothing to deliver is delivered at once.

        Returns False (and changes nothing) if the job already has its results, which
        happens when a redelivered task finishes twice.
        """
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] not in UNSETTLED_JOB_STATES:
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
            if queued:
                state = JobStateValues.RESULTS_READY
            elif row["shadow"]:
                state = JobStateValues.KEPT
            else:
                state = JobStateValues.DELIVERED
            self._set_job(
                conn,
                job_id,
                state=state,
                result=outcome.model_dump_json(),
                reason=None,
                results_at=now,
            )
        return True

    def retry_job(self, job_id: int) -> Job:
        """Send a failed (or finished) job through the whole path again, on the same
        manifest.

        Raises
        ------
        KeyError
            If there is no job with that id.
        ValueError
            If the job is still in progress, or a newer version has replaced it.
        """
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT state, superseded_by, manifest FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise KeyError(f"there is no job {job_id}")
            if row["superseded_by"] is not None:
                raise ValueError(
                    f"job {job_id} was replaced by job {row['superseded_by']}, which ran on "
                    "newer input; retry that one"
                )
            if row["state"] not in RETRYABLE_JOB_STATES:
                raise ValueError(
                    f"job {job_id} is {row['state']}; only failed, cancelled, delivered or "
                    "kept jobs can be retried"
                )
            if row["manifest"] is None:
                raise ValueError(f"job {job_id} has no input to run on")
            conn.execute("DELETE FROM deliveries WHERE job_id = ?", (job_id,))
            self._set_job(
                conn,
                job_id,
                state=JobStateValues.PENDING,
                reason=None,
                task_id=None,
                result=None,
                attempts=0,
                request=None,  # built anew from config.yaml now
                started_at=None,
                results_at=None,
            )
        job = self.job(job_id)
        assert job is not None
        return job

    def cancel_job(self, job_id: int, reason: str) -> Job:
        """Stop a job that has not finished: it is not dispatched (again), results that
        still come are dropped, and its deliveries still pending fail with ``reason``.
        Deliveries already acknowledged stay so. The caller revokes its Celery task.

        Raises
        ------
        KeyError
            If there is no job with that id.
        ValueError
            If the job has already finished (delivered, failed, kept, skipped,
            superseded or cancelled).
        """
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(f"there is no job {job_id}")
            if row["state"] not in IN_PROGRESS_JOB_STATES:
                raise ValueError(f"job {job_id} is {row['state']}; there is nothing to cancel")
            pending = conn.execute(
                "SELECT id FROM deliveries WHERE job_id = ? AND state = ?",
                (job_id, DeliveryStateValues.PENDING),
            ).fetchall()
            for delivery in pending:
                conn.execute(
                    "UPDATE deliveries SET state = ?, reason = ? WHERE id = ?",
                    (DeliveryStateValues.FAILED, reason, delivery["id"]),
                )
                self._record_attempt(conn, delivery["id"], now, "cancelled", reason)
            self._set_job(conn, job_id, state=JobStateValues.CANCELLED, reason=reason)
        job = self.job(job_id)
        assert job is not None
        return job

    def delivered_paths(self, job_id: int, destination: str) -> list[Path]:
        """The files of a job that went (or are still going) to ``destination``."""
        rows = self._query(
            "SELECT path FROM deliveries WHERE job_id = ? AND destination = ? AND state != ? "
            "ORDER BY id",
            (job_id, destination, DeliveryStateValues.FAILED),
        )
        return [Path(row["path"]) for row in rows]

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

    def delivery_attempts(self, delivery_id: int) -> list[DeliveryAttempt]:
        """Every try of a delivery, oldest first, with the error of each that failed."""
        rows = self._query(
            "SELECT at, outcome, reason FROM delivery_attempts WHERE delivery_id = ? "
            "ORDER BY rowid",
            (delivery_id,),
        )
        return [DeliveryAttempt(r["at"], r["outcome"], r["reason"]) for r in rows]

    @staticmethod
    def _record_attempt(
        conn: sqlite3.Connection, delivery_id: int, now: float, outcome: str, reason: str | None
    ) -> None:
        conn.execute(
            "INSERT INTO delivery_attempts (delivery_id, at, outcome, reason) VALUES (?, ?, ?, ?)",
            (delivery_id, now, outcome, reason),
        )

    def delivery(self, delivery_id: int) -> Delivery | None:
        rows = self._query("SELECT * FROM deliveries WHERE id = ?", (delivery_id,))
        return _delivery(rows[0]) if rows else None

    def resend_delivery(self, delivery_id: int, note: str) -> Delivery:
        """Send a failed (or an acknowledged) delivery's file again, now, with a fresh
        retry budget; its attempts so far stay in its history, followed by ``note``. A
        job that failed by its deliveries is waiting for results to be sent again.

        Raises
        ------
        KeyError
            If there is no delivery with that id.
        ValueError
            If it is still pending, or its job was cancelled or replaced.
        """
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT d.state, d.path, d.job_id, j.state AS job_state, j.superseded_by "
                "FROM deliveries d JOIN jobs j ON j.id = d.job_id WHERE d.id = ?",
                (delivery_id,),
            ).fetchone()
            if row is None:
                raise KeyError(f"there is no delivery {delivery_id}")
            if row["state"] == DeliveryStateValues.PENDING:
                raise ValueError(f"delivery {delivery_id} is still pending; it is sent as due")
            if row["job_state"] == JobStateValues.CANCELLED:
                raise ValueError(f"job {row['job_id']} was cancelled; retry the job instead")
            if row["superseded_by"] is not None:
                raise ValueError(
                    f"job {row['job_id']} was replaced by job {row['superseded_by']}; its "
                    "results are withdrawn, not sent again"
                )
            if not Path(row["path"]).is_file():
                raise ValueError(
                    f"{row['path']} is gone (removed by retention); retry job {row['job_id']}"
                )
            conn.execute(
                "UPDATE deliveries SET state = ?, attempts = 0, next_attempt_at = ?, "
                "reason = NULL, delivered_at = NULL WHERE id = ?",
                (DeliveryStateValues.PENDING, now, delivery_id),
            )
            self._record_attempt(conn, delivery_id, now, "resend", note)
            if row["job_state"] in (JobStateValues.FAILED, JobStateValues.DELIVERED):
                self._set_job(conn, row["job_id"], state=JobStateValues.RESULTS_READY, reason=None)
        delivery = self.delivery(delivery_id)
        assert delivery is not None
        return delivery

    # -- retention -------------------------------------------------------------------

    def study_activity(self) -> list[StudyActivity]:
        """Every study's activity, the longest idle first."""
        sql = _STUDY_ACTIVITY.format(where="", where_jobs="", where_series="")
        return [_study_activity(row) for row in self._query(sql)]

    @staticmethod
    def _one_study_activity(conn: sqlite3.Connection, uid: str) -> StudyActivity | None:
        sql = _STUDY_ACTIVITY.format(
            where="WHERE study_instance_uid = :uid",
            where_jobs="WHERE j.study_instance_uid = :uid",
            where_series="WHERE s.study_instance_uid = :uid",
        )
        row = conn.execute(sql, {"uid": uid}).fetchone()
        return None if row is None else _study_activity(row)

    def study_idle_since(self, study_instance_uid: str, idle_since: float) -> bool:
        """Whether the study is still idle, with no activity since ``idle_since``."""
        with self._lock:
            now = self._one_study_activity(self._conn, study_instance_uid)
        return now is not None and not now.busy and now.idle_since == idle_since

    def job_ids_of_study(self, study_instance_uid: str) -> list[int]:
        rows = self._query(
            "SELECT id FROM jobs WHERE study_instance_uid = ? ORDER BY id", (study_instance_uid,)
        )
        return [row["id"] for row in rows]

    def remove_study_data(
        self,
        study_instance_uid: str,
        idle_since: float,
        remove_files: Callable[[], object],
        *,
        records: bool,
    ) -> bool:
        """Retention: call ``remove_files`` (which deletes the study's spooled files)
        inside the transaction that then drops their rows, so that none of the study's
        instances is recorded meanwhile; with ``records`` every row of the study goes.
        Returns False, removing nothing, unless the study is still idle since
        ``idle_since``."""
        with self._transaction() as conn:
            now = self._one_study_activity(conn, study_instance_uid)
            if now is None or now.busy or now.idle_since != idle_since:
                return False
            remove_files()
            conn.execute(
                "DELETE FROM instances WHERE series_instance_uid IN "
                "(SELECT series_instance_uid FROM series WHERE study_instance_uid = ?)",
                (study_instance_uid,),
            )
            if records:
                for removed in _REMOVED_TOTALS:
                    conn.execute(removed, (study_instance_uid,))
                # Attempts go with their deliveries (ON DELETE CASCADE).
                conn.execute(
                    "DELETE FROM deliveries WHERE job_id IN "
                    "(SELECT id FROM jobs WHERE study_instance_uid = ?)",
                    (study_instance_uid,),
                )
                for table in ("jobs", "series", "studies"):
                    conn.execute(
                        f"DELETE FROM {table} WHERE study_instance_uid = ?", (study_instance_uid,)
                    )
        return True

    def begin_sending(self, delivery_id: int) -> None:
        """Note that a C-STORE of the delivery's file starts now (see
        :meth:`settle_interrupted_deliveries`)."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE deliveries SET sending_since = ? WHERE id = ?", (time.time(), delivery_id)
            )

    def settle_interrupted_deliveries(self) -> list[Delivery]:
        """Deliveries whose C-STORE was under way when the node stopped, each recorded as
        an interrupted attempt and due again now; for start-up.

        The destination may have stored such a file and answered after the node died, so
        the next send can be a second copy of the same SOP Instance (C-STORE has no way
        to ask); the attempt's reason says so, and the caller logs them.
        """
        now = time.time()
        reason = (
            "the node stopped while sending this file; the destination may already hold "
            "it, and it is sent again"
        )
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT * FROM deliveries WHERE sending_since IS NOT NULL AND state = ?",
                (DeliveryStateValues.PENDING,),
            ).fetchall()
            for row in rows:
                conn.execute(
                    "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?, "
                    "reason = ?, last_attempt_at = ?, sending_since = NULL WHERE id = ?",
                    (now, reason, row["sending_since"], row["id"]),
                )
                self._record_attempt(conn, row["id"], row["sending_since"], "retry", reason)
            conn.execute(
                "UPDATE deliveries SET sending_since = NULL WHERE sending_since IS NOT NULL"
            )
        return [_delivery(row) for row in rows]

    def mark_delivery_done(self, delivery_id: int) -> None:
        self._finish_delivery(delivery_id, DeliveryStateValues.DELIVERED, None)

    def mark_delivery_failed(self, delivery_id: int, reason: str) -> None:
        self._finish_delivery(delivery_id, DeliveryStateValues.FAILED, reason)

    def postpone_delivery(self, delivery_id: int, next_attempt_at: float, reason: str) -> None:
        now = time.time()
        with self._transaction() as conn:
            conn.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?, reason = ?, "
                "last_attempt_at = ?, sending_since = NULL WHERE id = ?",
                (next_attempt_at, reason, now, delivery_id),
            )
            self._record_attempt(conn, delivery_id, now, "retry", reason)

    def _finish_delivery(
        self, delivery_id: int, state: DeliveryStateValues, reason: str | None
    ) -> None:
        """Close one delivery, and its job once every delivery of the job is closed."""
        now = time.time()
        delivered = now if state == DeliveryStateValues.DELIVERED else None
        with self._transaction() as conn:
            conn.execute(
                "UPDATE deliveries SET state = ?, reason = ?, attempts = attempts + 1, "
                "last_attempt_at = ?, delivered_at = ?, sending_since = NULL WHERE id = ?",
                (state, reason, now, delivered, delivery_id),
            )
            self._record_attempt(conn, delivery_id, now, str(state), reason)
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

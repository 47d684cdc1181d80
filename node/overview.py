"""What the console shows, read from the state DB: the dashboard's figures, the studies,
one study with its series, jobs (each with its stage timeline) and deliveries, and the
failures.

Every function returns plain JSON-ready dicts, so the JSON API (``/api/...``) and the
HTML pages (:mod:`node.console`) show the same thing. The queries run on the console's
own read-only connection: a slow page never holds up the SCP's writes.
"""

from __future__ import annotations

import itertools
import time
from datetime import datetime
from typing import Any

from node.state import (
    IN_PROGRESS_JOB_STATES,
    RETRYABLE_JOB_STATES,
    DeliveryStateValues,
    Job,
    JobStateValues,
    SeriesStateValues,
    StateDB,
)
from workers.outputs import OVERLAY_PREFIX

__all__ = [
    "PAGE_SIZE",
    "dashboard",
    "failures",
    "job_detail",
    "start_of_today",
    "studies",
    "study_detail",
    "timeline",
]

#: Studies per page of the studies list.
PAGE_SIZE = 50
#: Failures listed, newest first.
_FAILURES_SHOWN = 200


def start_of_today(now: float | None = None) -> float:
    """Local midnight (epoch seconds): where "today" starts for the dashboard."""
    moment = datetime.fromtimestamp(time.time() if now is None else now)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def _counts(db: StateDB, sql: str, params: tuple[Any, ...] = ()) -> dict[str, int]:
    return {str(row[0]): int(row[1]) for row in db.select(sql, params)}


def _in_progress(db: StateDB, now: float) -> list[dict[str, Any]]:
    """What has waited longest in each stage that is moving now (the dashboard's
    "slowest stage"): series receiving, jobs waiting for dispatch, in the queue or
    running, and deliveries not yet acknowledged."""
    waits: list[dict[str, Any]] = []
    row = db.select(
        "SELECT series_instance_uid, first_received FROM series WHERE state = ? "
        "ORDER BY first_received LIMIT 1",
        (SeriesStateValues.RECEIVING,),
    )
    if row:
        waits.append(
            {
                "stage": "receiving",
                "what": f"series {row[0]['series_instance_uid']}",
                "seconds": now - row[0]["first_received"],
            }
        )
    for state, since in (
        (JobStateValues.PENDING, "created_at"),
        (JobStateValues.QUEUED, "dispatched_at"),
        (JobStateValues.RUNNING, "started_at"),
    ):
        row = db.select(
            f"SELECT id, model, {since} AS since FROM jobs WHERE state = ? "
            f"ORDER BY {since} LIMIT 1",
            (state,),
        )
        if row and row[0]["since"] is not None:
            waits.append(
                {
                    "stage": str(state),
                    "what": f"job {row[0]['id']} ({row[0]['model']})",
                    "job_id": row[0]["id"],
                    "seconds": now - row[0]["since"],
                }
            )
    row = db.select(
        "SELECT id, job_id, destination, created_at FROM deliveries WHERE state = ? "
        "ORDER BY created_at LIMIT 1",
        (DeliveryStateValues.PENDING,),
    )
    if row:
        waits.append(
            {
                "stage": "delivering",
                "what": f"delivery {row[0]['id']} of job {row[0]['job_id']} to "
                f"{row[0]['destination']}",
                "job_id": row[0]["job_id"],
                "seconds": now - row[0]["created_at"],
            }
        )
    return sorted(waits, key=lambda wait: -wait["seconds"])


def dashboard(db: StateDB, now: float | None = None) -> dict[str, Any]:
    """Today's figures, jobs and deliveries by state, the last instance per peer and
    what has waited longest (the broker's and the disk's side: :mod:`node.health`)."""
    now = time.time() if now is None else now
    today = start_of_today(now)
    instances_today = db.select("SELECT COUNT(*) FROM instances WHERE received_at >= ?", (today,))
    studies_today = db.select("SELECT COUNT(*) FROM studies WHERE first_received >= ?", (today,))
    peers = db.select(
        "SELECT calling_ae_title, MAX(last_received) AS last FROM series "
        "GROUP BY calling_ae_title ORDER BY last DESC"
    )
    return {
        "instances_today": instances_today[0][0],
        "studies_today": studies_today[0][0],
        "jobs": _counts(db, "SELECT state, COUNT(*) FROM jobs GROUP BY state"),
        "deliveries": _counts(db, "SELECT state, COUNT(*) FROM deliveries GROUP BY state"),
        "last_instance_by_peer": {row[0]: row[1] for row in peers},
        "waiting_longest": _in_progress(db, now),
    }


def studies(db: StateDB, *, text: str = "", study_date: str = "", page: int = 1) -> dict[str, Any]:
    """Studies, newest first, ``PAGE_SIZE`` a page: those whose patient ID, accession
    number or patient name starts with ``text`` (any case), of one study date
    (YYYYMMDD, or YYYY-MM-DD)."""
    where: list[str] = []
    params: list[Any] = []
    text = text.strip()
    if text:
        pattern = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where.append(
            "(st.patient_id LIKE ? ESCAPE '\\' OR st.accession_number LIKE ? ESCAPE '\\' "
            "OR st.patient_name LIKE ? ESCAPE '\\')"
        )
        params += [pattern, pattern, pattern]
    if study_date.strip():
        where.append("st.study_date = ?")
        params.append(study_date.strip().replace("-", ""))
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    page = max(1, page)
    total = db.select(f"SELECT COUNT(*) FROM studies st {clause}", params)[0][0]
    rows = db.select(
        f"SELECT st.* FROM studies st {clause} ORDER BY st.first_received DESC, "
        "st.study_instance_uid LIMIT ? OFFSET ?",
        [*params, PAGE_SIZE, (page - 1) * PAGE_SIZE],
    )
    uids = [row["study_instance_uid"] for row in rows]
    marks = ", ".join("?" for _ in uids)
    jobs: dict[str, dict[str, int]] = {uid: {} for uid in uids}
    series_count: dict[str, int] = dict.fromkeys(uids, 0)
    if uids:
        for row in db.select(
            f"SELECT study_instance_uid, state, COUNT(*) FROM jobs "
            f"WHERE study_instance_uid IN ({marks}) GROUP BY study_instance_uid, state",
            uids,
        ):
            jobs[row[0]][row[1]] = row[2]
        for row in db.select(
            f"SELECT study_instance_uid, COUNT(*) FROM series "
            f"WHERE study_instance_uid IN ({marks}) GROUP BY study_instance_uid",
            uids,
        ):
            series_count[row[0]] = row[1]
    return {
        "total": total,
        "page": page,
        "pages": max(1, -(-total // PAGE_SIZE)),
        "studies": [
            {**_study(row), "series": series_count[row[0]], "jobs": jobs[row[0]]} for row in rows
        ],
    }


def _study(row: Any) -> dict[str, Any]:
    return {
        "study_instance_uid": row["study_instance_uid"],
        "patient_id": row["patient_id"] or "",
        "patient_name": row["patient_name"] or "",
        "accession_number": row["accession_number"] or "",
        "study_date": row["study_date"] or "",
        "study_description": row["study_description"] or "",
        "first_received": row["first_received"],
    }


def timeline(db: StateDB, job: Job) -> list[dict[str, Any]]:
    """A job's stages in order, each with when it started and how long it took: the
    series received and falling quiet, routing, the queue, the worker's own stages
    (start, load, model, write), and delivery until the last acknowledgement.
    Stages not reached yet are left out."""
    series = db.series(job.series_instance_uid)
    delivered = db.select(
        "SELECT MAX(delivered_at) FROM deliveries WHERE job_id = ? AND state = ?",
        (job.id, DeliveryStateValues.DELIVERED),
    )[0][0]
    points: list[tuple[str, float | None]] = []
    if series is not None:
        points += [
            ("receiving", series.first_received),
            ("quiet period", series.last_received),
            ("routing", series.completed_at),
        ]
    points += [("dispatch", job.created_at), ("queue", job.dispatched_at)]
    outcome = job.result
    worker = outcome.stages_at if outcome is not None else {}
    if worker:
        points += [("start", job.started_at)] if job.started_at else []
        points += [
            (stage, worker[stage]) for stage in ("load", "model", "write") if stage in worker
        ]
        points.append(("collection", worker.get("done")))
    else:
        points.append(("worker", job.started_at))
    if job.results_at is not None:
        points.append(("delivery", job.results_at))
    points.append(("end", delivered))
    stages = []
    known = [(name, at) for name, at in points if at is not None]
    for (name, start), (_, end) in itertools.pairwise(known):
        stages.append({"stage": name, "start": start, "seconds": max(0.0, end - start)})
    return stages


def _job(db: StateDB, job: Job) -> dict[str, Any]:
    outcome = job.result
    return {
        "id": job.id,
        "model": job.model,
        "rule": job.rule,
        "state": str(job.state),
        "reason": job.reason,
        "revision": job.revision,
        "series_instance_uid": job.series_instance_uid,
        "study_instance_uid": job.study_instance_uid,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "shadow": job.shadow,
        "superseded_by": job.superseded_by,
        "timings_s": outcome.timings_s if outcome is not None else {},
        "measurements": list(outcome.measurements) if outcome is not None else [],
        "findings": list(outcome.findings) if outcome is not None else [],
        "files": [f.name for f in outcome.files] if outcome is not None else [],
        # node.console's preview draws what `pacsnode render` draws: a SEG or overlays.
        "previewable": outcome is not None
        and any(f.name.startswith(("seg-", OVERLAY_PREFIX)) for f in outcome.files),
        "timeline": timeline(db, job),
        "deliveries": [
            {
                "id": d.id,
                "destination": d.destination,
                "file": d.path.name,
                "state": str(d.state),
                "attempts": d.attempts,
                "reason": d.reason,
                "delivered_at": d.delivered_at,
                "history": [
                    {"at": a.at, "outcome": a.outcome, "reason": a.reason}
                    for a in db.delivery_attempts(d.id)
                ],
            }
            for d in db.deliveries(job.id)
        ],
        "actions": _actions(job),
    }


def _actions(job: Job) -> list[str]:
    """What the console offers for a job (:class:`node.state.StateDB` decides)."""
    actions = []
    if job.state in IN_PROGRESS_JOB_STATES:
        actions.append("cancel")
    if job.superseded_by is None and job.state in RETRYABLE_JOB_STATES:
        actions.append("retry")
    return actions


def job_detail(db: StateDB, job_id: int) -> dict[str, Any] | None:
    job = db.job(job_id)
    return None if job is None else _job(db, job)


def study_detail(db: StateDB, study_instance_uid: str) -> dict[str, Any] | None:
    """One study: its details, each series with routing's decision, each job."""
    rows = db.select("SELECT * FROM studies WHERE study_instance_uid = ?", (study_instance_uid,))
    series = db.series_of_study(study_instance_uid)
    if not rows and not series:
        return None
    counts: dict[str, int] = {
        row[0]: row[1]
        for row in db.select(
            "SELECT i.series_instance_uid, COUNT(*) FROM instances i JOIN series s "
            "USING (series_instance_uid) WHERE s.study_instance_uid = ? "
            "GROUP BY i.series_instance_uid",
            (study_instance_uid,),
        )
    }
    details = _study(rows[0]) if rows else {"study_instance_uid": study_instance_uid}
    return {
        **details,
        "series": [
            {
                "series_instance_uid": s.series_instance_uid,
                "calling_ae_title": s.calling_ae_title,
                "instances": counts.get(s.series_instance_uid, 0),
                "state": str(s.state),
                "reason": s.reason,
                "first_received": s.first_received,
                "last_received": s.last_received,
                "late_instances": s.late_instances,
            }
            for s in series
        ],
        "jobs": [_job(db, job) for job in db.jobs(study_instance_uid=study_instance_uid)],
    }


def failures(db: StateDB) -> dict[str, Any]:
    """Failed jobs and failed deliveries, newest first, with their reasons."""
    jobs = db.select(
        "SELECT id, model, study_instance_uid, series_instance_uid, reason, updated_at, "
        "superseded_by FROM jobs WHERE state = ? ORDER BY updated_at DESC LIMIT ?",
        (JobStateValues.FAILED, _FAILURES_SHOWN),
    )
    deliveries = db.select(
        "SELECT d.id, d.job_id, d.destination, d.path, d.reason, d.attempts, "
        "d.last_attempt_at, j.model, j.study_instance_uid FROM deliveries d "
        "JOIN jobs j ON j.id = d.job_id WHERE d.state = ? AND j.superseded_by IS NULL "
        "AND j.state != ? ORDER BY d.last_attempt_at DESC LIMIT ?",
        (DeliveryStateValues.FAILED, JobStateValues.CANCELLED, _FAILURES_SHOWN),
    )
    in_progress = ", ".join("?" for _ in IN_PROGRESS_JOB_STATES)
    moving = db.select(
        f"SELECT (SELECT COUNT(*) FROM jobs WHERE state IN ({in_progress})) + "
        "(SELECT COUNT(*) FROM deliveries WHERE state = ?)",
        (*IN_PROGRESS_JOB_STATES, DeliveryStateValues.PENDING),
    )[0][0]
    return {
        "moving": moving,
        "jobs": [
            {
                "id": row["id"],
                "model": row["model"],
                "study_instance_uid": row["study_instance_uid"],
                "series_instance_uid": row["series_instance_uid"],
                "reason": row["reason"],
                "at": row["updated_at"],
                "can_retry": row["superseded_by"] is None,
            }
            for row in jobs
        ],
        "deliveries": [
            {
                "id": row["id"],
                "job_id": row["job_id"],
                "model": row["model"],
                "study_instance_uid": row["study_instance_uid"],
                "destination": row["destination"],
                "file": row["path"].rsplit("/", 1)[-1],
                "reason": row["reason"],
                "attempts": row["attempts"],
                "at": row["last_attempt_at"],
            }
            for row in deliveries
        ],
    }

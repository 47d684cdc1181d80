"""Dispatch jobs to Celery and collect what the workers report.

The node sends each job's :class:`workers.contract.JobRequest` (its manifest, what to
write, the version it replaces), never datasets and never a folder to look into; it
stores the request as sent and turns the worker's :class:`workers.contract.JobOutcome`
into one state change per job.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.result import AsyncResult
from pydantic import ValidationError

from models.registry import get_model_class
from node.config import Config
from node.state import Job, JobInFlight, JobStateValues, StateDB
from workers.contract import (
    RUN_MODEL,
    JobOutcome,
    JobRequest,
    Manifest,
    Predecessor,
    ResultInstance,
)
from workers.lease import lease_key, redis_client
from workers.outputs import OutputProfile, OutputRequest

__all__ = ["Dispatcher", "results_dir"]

logger = logging.getLogger(__name__)


def results_dir(data_dir: Path, job_id: int) -> Path:
    """Where a job's worker writes its output files."""
    return data_dir / "results" / f"job-{job_id}"


#: How often running jobs' leases are looked at.
_LEASE_CHECK_SECONDS = 1.0


class Dispatcher:
    """Sends pending jobs and collects finished ones.

    Parameters
    ----------
    config
        The node's configuration (data folder, job timeout, attempts).
    db
        The state DB.
    celery_app
        A configured Celery app (broker and result backend set).
    """

    def __init__(self, config: Config, db: StateDB, celery_app: Celery) -> None:
        self.config = config
        self.db = db
        self.app = celery_app
        self._leases: redis.Redis | None = None
        self._leases_checked_at = 0.0

    def _lost_leases(self, running: list[JobInFlight], now: float) -> set[int]:
        """Running jobs whose lease expired (:mod:`workers.lease`): their worker is gone.
        Asked at most once a second; a job gets one lease period from when it started
        to take its lease; a broker that cannot be asked loses nobody."""
        if not running or now - self._leases_checked_at < _LEASE_CHECK_SECONDS:
            return set()
        self._leases_checked_at = now
        grace = self.config.worker.lease_seconds
        due = [j.id for j in running if j.started_at is not None and now - j.started_at > grace]
        if not due:
            return set()
        try:
            if self._leases is None:
                self._leases = redis_client(str(self.app.conf.broker_url))
            held = self._leases.exists(*(lease_key(job_id) for job_id in due))
            if held == len(due):
                return set()
            return {job_id for job_id in due if not self._leases.exists(lease_key(job_id))}
        except redis.RedisError as exc:
            logger.warning("cannot read job leases: %s", exc)
            return set()

    def dispatch_pending(self) -> int:
        """Send every pending job to its model's queue; returns how many were sent.

        A job waits while an earlier version of its lineage may still produce results,
        so that it knows which results it replaces. A job dispatched before (requeued
        after a restart or a lost worker) is sent with the request it had, so it writes
        the same objects.
        """
        sent = 0
        for job in self.db.jobs([JobStateValues.PENDING]):
            if job.attempts >= self.config.worker.max_attempts:
                self.db.mark_job_failed(
                    job.id,
                    f"gave up after {job.attempts} attempts"
                    + (f"; last: {job.reason}" if job.reason else ""),
                )
                continue
            if job.manifest is None:
                self.db.mark_job_failed(job.id, "the job has no input recorded")
                continue
            if self.db.earlier_version_unsettled(job):
                continue
            try:
                queue = get_model_class(job.model).queue
            except KeyError as exc:
                self.db.mark_job_failed(job.id, str(exc))
                continue
            request = job.request or self.request_for(job, job.manifest)
            result = self.app.send_task(
                RUN_MODEL, kwargs={"request": request.model_dump(mode="json")}, queue=queue
            )
            self.db.mark_job_queued(job.id, result.id, request)
            logger.info(
                "job %d (%s, rev %d) queued on %s",
                job.id,
                job.model,
                request.revision,
                queue,
                extra={"job_id": job.id},
            )
            sent += 1
        return sent

    def request_for(self, job: Job, manifest: Manifest) -> JobRequest:
        """The job's request: its manifest, what to write (config.yaml now), and the
        version it replaces, if any, with what each destination holds of it."""
        previous = self.db.previous_results(job)
        predecessor = None
        rejections: dict[str, tuple[ResultInstance, ...]] = {}
        if previous is not None and previous.result is not None:
            revision = previous.revision or 1
            predecessor = Predecessor(
                job_id=previous.id, revision=revision, reports=previous.result.reports
            )
            notes = set(previous.result.rejection_notes.values())
            for name in job.destinations:
                destination = self.config.destinations.get(name)
                if destination is None or destination.supersede != "rejection_note":
                    continue
                held = {str(path) for path in self.db.delivered_paths(previous.id, name)}
                rejected = tuple(
                    f for f in previous.result.files if f.path in held and f.name not in notes
                )
                if rejected:
                    rejections[name] = rejected
        return JobRequest(
            job_id=job.id,
            model=job.model,
            manifest=manifest,
            output_dir=str(results_dir(self.config.node.data_dir, job.id)),
            outputs=self._outputs(job),
            revision=predecessor.revision + 1 if predecessor is not None else 1,
            predecessor=predecessor,
            rejections=rejections,
            created_at=time.time(),
        )

    def _outputs(self, job: Job) -> OutputRequest:
        """What the worker writes and each destination receives, from config.yaml now; a
        destination no longer in config.yaml gets the default profile (the sender then
        reports it as unknown)."""
        destinations = self.config.destinations
        profiles = {
            name: destinations[name].profile if name in destinations else OutputProfile()
            for name in job.destinations
        }
        return OutputRequest.for_destinations(profiles, **self.config.results.model_dump())

    def collect(self) -> int:
        """Record the outcome of every queued or running job that has one; returns how
        many jobs settled (their deliveries may be due)."""
        now = time.time()
        settled = 0
        in_flight = self.db.jobs_in_flight()
        lost = self._lost_leases([j for j in in_flight if j.state == JobStateValues.RUNNING], now)
        for job in in_flight:
            if job.task_id is None:
                self.db.mark_job_pending(job.id, "lost its task id")
                continue
            result: AsyncResult[Any] = AsyncResult(job.task_id, app=self.app)
            state = result.state
            if state == "STARTED" and job.state == JobStateValues.QUEUED:
                self.db.mark_job_running(job.id)
            elif state == "SUCCESS":
                full = self.db.job(job.id)
                if full is not None:
                    self._record_success(full, result.result)
                    settled += 1
                result.forget()
            elif state == "FAILURE":
                error = result.result
                self.db.mark_job_failed(job.id, f"worker error: {type(error).__name__}: {error}")
                result.forget()
                settled += 1
            elif job.id in lost:
                self.db.mark_job_pending(
                    job.id,
                    f"its worker stopped renewing the job's lease for "
                    f"{self.config.worker.lease_seconds:.0f} s (presumed dead); dispatched again",
                )
                self.app.control.revoke(job.task_id)  # should the broker hand it out again
                logger.warning(
                    "job %d lost its worker (lease expired); dispatched again", job.id,
                    extra={"job_id": job.id},
                )  # fmt: skip
            elif (
                job.state == JobStateValues.RUNNING
                and job.dispatched_at is not None
                and now - job.dispatched_at > self.config.worker.job_timeout_seconds
            ):
                self.db.mark_job_pending(
                    job.id,
                    f"no result after {self.config.worker.job_timeout_seconds:.0f} s "
                    "(worker presumed lost)",
                )
        return settled

    def _record_success(self, job: Job, returned: Any) -> None:
        try:
            outcome = JobOutcome.model_validate(returned)
        except ValidationError as exc:
            self.db.mark_job_failed(job.id, f"worker returned an unexpected result: {exc}")
            return
        if outcome.status == "failed":
            self.db.mark_job_failed(job.id, outcome.reason or "no reason given")
            return
        # The request as dispatched (config.yaml may have changed since).
        request = job.request.outputs if job.request is not None else self._outputs(job)
        by_name = {f.name: Path(f.path) for f in outcome.files}
        deliveries = {}
        for name in job.destinations:
            profile = request.destinations.get(name, OutputProfile())
            chosen = profile.select(list(by_name), empty_result=outcome.empty)
            if name in outcome.rejection_notes:
                chosen.append(outcome.rejection_notes[name])  # after the new version
            deliveries[name] = [by_name[f] for f in chosen]
        if self.db.record_results(job.id, outcome, deliveries):
            logger.info("job %d results ready", job.id, extra={"job_id": job.id})

    def requeue_unfinished(self, reason: str) -> int:
        """Put queued and running jobs back in line (start-up, or the worker was lost).

        Tasks are idempotent (deterministic output UIDs), so a task that still runs
        somewhere only writes the same files again.
        """
        requeued = 0
        for job in self.db.jobs([JobStateValues.QUEUED, JobStateValues.RUNNING]):
            result: AsyncResult[Any] | None = (
                AsyncResult(job.task_id, app=self.app) if job.task_id else None
            )
            state = result.state if result is not None else "PENDING"
            if state in {"SUCCESS", "FAILURE"}:
                continue  # finished while we were away; collect() records it
            started = job.state == JobStateValues.RUNNING or state != "PENDING"
            self.db.mark_job_pending(job.id, reason, never_started=not started)
            requeued += 1
        return requeued

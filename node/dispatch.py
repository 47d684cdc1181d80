"""Dispatch jobs to Celery and collect what the workers report.

The node sends ids and paths, never datasets; it learns the outcome from the result
backend and turns it into one state change per job.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from models.registry import get_model_class
from node.config import Config
from node.state import Job, JobStateValues, StateDB
from workers.outputs import OutputProfile, OutputRequest
from workers.tasks import RUN_MODEL

__all__ = ["Dispatcher", "results_dir"]

logger = logging.getLogger(__name__)


def results_dir(data_dir: Path, job_id: int) -> Path:
    """Where a job's worker writes its output files."""
    return data_dir / "results" / f"job-{job_id}"


def series_dir(data_dir: Path, job: Job) -> Path:
    """Where the spool keeps the instances of a job's series."""
    return data_dir / "spool" / job.study_instance_uid / job.series_instance_uid


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

    def dispatch_pending(self) -> int:
        """Send every pending job to its model's queue; returns how many were sent."""
        sent = 0
        for job in self.db.jobs([JobStateValues.PENDING]):
            if job.attempts >= self.config.worker.max_attempts:
                self.db.mark_job_failed(
                    job.id,
                    f"gave up after {job.attempts} attempts"
                    + (f"; last: {job.reason}" if job.reason else ""),
                )
                continue
            try:
                queue = get_model_class(job.model).queue
            except KeyError as exc:
                self.db.mark_job_failed(job.id, str(exc))
                continue
            source = series_dir(self.config.node.data_dir, job)
            result = self.app.send_task(
                RUN_MODEL,
                kwargs={
                    "job_id": job.id,
                    "model": job.model,
                    "series_dir": str(source),
                    "output_dir": str(results_dir(self.config.node.data_dir, job.id)),
                    "outputs": self._outputs(job).model_dump(mode="json"),
                },
                queue=queue,
            )
            self.db.mark_job_queued(job.id, result.id)
            logger.info(
                "job %d (%s) queued on %s", job.id, job.model, queue, extra={"job_id": job.id}
            )
            sent += 1
        return sent

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

    def collect(self) -> None:
        """Record the outcome of every queued or running job that has one."""
        now = time.time()
        for job in self.db.jobs([JobStateValues.QUEUED, JobStateValues.RUNNING]):
            if job.task_id is None:
                self.db.mark_job_pending(job.id, "lost its task id")
                continue
            result: AsyncResult[Any] = AsyncResult(job.task_id, app=self.app)
            state = result.state
            if state == "STARTED" and job.state == JobStateValues.QUEUED:
                self.db.mark_job_running(job.id)
            elif state == "SUCCESS":
                self._record_success(job, result.result)
                result.forget()
            elif state == "FAILURE":
                error = result.result
                self.db.mark_job_failed(job.id, f"worker error: {type(error).__name__}: {error}")
                result.forget()
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

    def _record_success(self, job: Job, outcome: Any) -> None:
        if not isinstance(outcome, dict) or outcome.get("status") not in {"ok", "failed"}:
            self.db.mark_job_failed(job.id, f"worker returned an unexpected result: {outcome!r}")
            return
        if outcome["status"] == "failed":
            self.db.mark_job_failed(job.id, str(outcome.get("reason", "no reason given")))
            return
        files = [Path(path) for path in outcome["files"]]
        empty = bool(outcome.get("empty", False))
        # The profiles the worker wrote for (config.yaml may have changed since dispatch).
        request = (
            OutputRequest.model_validate(outcome["outputs"])
            if "outputs" in outcome
            else self._outputs(job)
        )
        by_name = {path.name: path for path in files}
        deliveries = {
            name: [
                by_name[f]
                for f in request.destinations.get(name, OutputProfile()).select(
                    list(by_name), empty_result=empty
                )
            ]
            for name in job.destinations
        }
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
            if result is not None and result.state in {"SUCCESS", "FAILURE"}:
                continue  # finished while we were away; collect() records it
            self.db.mark_job_pending(job.id, reason)
            requeued += 1
        return requeued

"""Celery tasks: thin wrappers that call :mod:`workers.pipeline` with a job's request."""

from __future__ import annotations

from typing import Any

from workers import inputs, pipeline
from workers.celery_app import app
from workers.contract import PRELOAD, RUN_MODEL, JobRequest, ManifestInstance
from workers.lease import job_lease

__all__ = ["preload_series", "run_model"]


@app.task(name=RUN_MODEL, acks_late=True, reject_on_worker_lost=True)
def run_model(*, request: dict[str, Any]) -> dict[str, Any]:
    """Run the job ``request`` (a :class:`workers.contract.JobRequest` as JSON) and
    return its :class:`workers.contract.JobOutcome` as JSON."""
    job = JobRequest.model_validate(request)
    lease_seconds = float(app.conf.get("pacsnode_lease_seconds", 10.0))
    with job_lease(str(app.conf.broker_url), job.job_id, lease_seconds):
        outcome = pipeline.run_job(job)
    return outcome.model_dump(mode="json")


@app.task(name=PRELOAD, acks_late=False, ignore_result=True)
def preload_series(*, instances: list[dict[str, Any]]) -> bool:
    """Decode the series of ``instances`` (manifest instances as JSON) for the job the
    node will create when its quiet period ends (:mod:`workers.inputs`). A hint: lost
    with its worker, and nothing to report."""
    return inputs.preload([ManifestInstance.model_validate(i) for i in instances])

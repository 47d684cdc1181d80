"""Celery tasks: thin wrappers that call :mod:`workers.pipeline` with ids and paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workers import pipeline
from workers.celery_app import app
from workers.outputs import OutputRequest

__all__ = ["RUN_MODEL", "run_model"]

RUN_MODEL = "pacsnode.run_model"


@app.task(name=RUN_MODEL, acks_late=True, reject_on_worker_lost=True)
def run_model(
    *,
    job_id: int,
    model: str,
    series_dir: str,
    output_dir: str,
    outputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``model`` on the series in ``series_dir`` and write the result files that
    ``outputs`` (a :class:`workers.outputs.OutputRequest` as JSON) names into ``output_dir``."""
    return pipeline.run_job(
        job_id=job_id,
        model_name=model,
        series_dir=Path(series_dir),
        output_dir=Path(output_dir),
        outputs=OutputRequest.model_validate(outputs) if outputs is not None else None,
    )

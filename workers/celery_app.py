"""The Celery application, shared by the node (which sends tasks) and the workers."""

from __future__ import annotations

from celery import Celery

__all__ = ["app", "configure"]

app = Celery("pacsnode")


def configure(broker_url: str, *, job_timeout_seconds: float) -> None:
    """Point the app at the broker and set the delivery guarantees pacsnode relies on.

    Tasks are acknowledged only after they finish and requeued if their worker dies;
    each worker process takes one task at a time (a GPU job must not wait behind
    another one prefetched by a busy worker).
    """
    app.conf.update(
        broker_url=broker_url,
        result_backend=broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": int(job_timeout_seconds) + 60},
        result_backend_transport_options={"visibility_timeout": int(job_timeout_seconds) + 60},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        result_expires=7 * 24 * 3600,
        imports=["workers.tasks"],
    )

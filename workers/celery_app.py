"""The Celery application, shared by the node (which sends tasks) and the workers."""

from __future__ import annotations

import ctypes
import signal

from celery import Celery

__all__ = ["app", "configure", "prepare_job_process"]

_PR_SET_PDEATHSIG = 1

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


def prepare_job_process(torch_threads: int) -> None:
    """Set up a job process of a prefork worker, just after it forked: it dies with the
    worker (a worker killed with SIGKILL must not leave jobs running that nobody
    collects), and torch uses its share of the cores."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    import torch

    torch.set_num_threads(torch_threads)

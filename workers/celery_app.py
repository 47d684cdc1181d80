"""The Celery application, shared by the node (which sends tasks) and the workers."""

from __future__ import annotations

import ctypes
import signal

from celery import Celery

__all__ = ["app", "configure", "load_standard_tables", "prepare_job_process"]

_PR_SET_PDEATHSIG = 1

app = Celery("pacsnode")


def configure(broker_url: str, *, job_timeout_seconds: float, lease_seconds: float = 10.0) -> None:
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
        # How long a running job's lease lasts without renewal (workers.lease).
        pacsnode_lease_seconds=lease_seconds,
    )


def prepare_job_process(torch_threads: int) -> None:
    """Set up a job process of a prefork worker, just after it forked: it dies with the
    worker (a worker killed with SIGKILL must not leave jobs running that nobody
    collects), and torch uses its share of the cores."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    import torch

    torch.set_num_threads(torch_threads)


def load_standard_tables() -> None:
    """Parse highdicom's tables of the DICOM standard (IODs, modules, attributes; a
    large JSON read on first use) now, in the worker before its job processes fork: they
    share the tables, and no job process's first SEG spends 0.4 s reading them. The
    loaders are highdicom internals; one that is gone is skipped (the first SEG pays)."""
    from highdicom import _standard_utils as tables

    for name in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        loader = getattr(tables, name, None)
        if callable(loader):
            loader()

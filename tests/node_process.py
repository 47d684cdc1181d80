"""``pacsnode run`` as a separate process, for integration tests and benchmarks.

The node is started exactly as an admin starts it (the console script with a config
file), with its embedded Redis and worker, on a free loopback port.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from node.state import Job, JobStateValues, StateDB
from tests.peers import free_port, wait_for, wait_for_port

__all__ = ["NodeProcess", "node_config"]

NODE_AE_TITLE = "PACSNODE"
_PACSNODE = Path(sys.executable).parent / "pacsnode"


def node_config(
    data_dir: Path,
    *,
    port: int,
    peers: list[dict[str, Any]] | None = None,
    destinations: dict[str, dict[str, Any]] | None = None,
    rules: list[dict[str, Any]] | None = None,
    quiet_seconds: float = 1.0,
    **extra: Any,
) -> dict[str, Any]:
    """A config.yaml (as a dict) for a test node on ``port``."""
    config: dict[str, Any] = {
        "node": {
            "ae_title": NODE_AE_TITLE,
            "port": port,
            "bind_address": "127.0.0.1",
            "data_dir": str(data_dir),
        },
        "peers": peers if peers is not None else [{"ae_title": "SCANNER", "host": "127.0.0.1"}],
        "destinations": destinations or {},
        "completion": {"quiet_seconds": quiet_seconds},
        "rules": rules or [],
        "delivery": {"first_retry_seconds": 1.0, "max_retry_interval_seconds": 2.0},
    }
    config.update(extra)
    return config


def rss_kib(pid: int) -> int:
    """A process's resident memory (KiB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for process {pid}")


class NodeProcess:
    """Runs ``pacsnode run --config FILE``; restartable, killable.

    Parameters
    ----------
    workdir
        Holds config.yaml, the data folder and the node's log.
    config
        The configuration; ``node.port``, ``node.data_dir`` and ``http.port`` are
        filled in if absent.
    executable
        The ``pacsnode`` console script (this environment's by default).
    """

    def __init__(self, workdir: Path, config: dict[str, Any], executable: Path = _PACSNODE) -> None:
        self.workdir = workdir
        self.executable = executable
        workdir.mkdir(parents=True, exist_ok=True)
        node = config.setdefault("node", {})
        node.setdefault("port", free_port())
        node.setdefault("data_dir", str(workdir / "data"))
        node.setdefault("bind_address", "127.0.0.1")
        http = config.setdefault("http", {})
        http.setdefault("port", free_port())
        self.config = config
        self.port: int = node["port"]
        self._console_port: int | None = http["port"] if http.get("enabled", True) else None
        #: The console's base URL (``http.port``).
        self.console_url = f"http://127.0.0.1:{http['port']}"
        self.data_dir = Path(node["data_dir"])
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "node.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.executable), "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            wait_for_port(self.port, timeout=timeout, what="pacsnode SCP", process=self.process)
            if self._console_port is not None:  # bound after the SCP starts
                wait_for_port(
                    self._console_port, timeout=timeout, what="the console", process=self.process
                )
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}\nnode log:\n{self.log()[-4000:]}") from exc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the node, as a crash would; its children die with it."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.process = None
        self._wait_children_gone()

    def kill_worker(self) -> None:
        """SIGKILL the node's embedded worker, as a crash would (the node restarts it)."""
        assert self.process is not None
        pgrep = shutil.which("pgrep")
        assert pgrep is not None
        found = subprocess.run(
            [pgrep, "-P", str(self.process.pid), "-f", "node.cli worker"],
            capture_output=True,
            text=True,
            check=True,
        )
        os.kill(int(found.stdout.split()[0]), signal.SIGKILL)

    def _wait_children_gone(self) -> None:
        # The embedded Redis and worker get a signal from the kernel when the node dies.
        pidfile = self.data_dir / "redis" / "redis.pid"

        def redis_gone() -> bool:
            try:
                os.kill(int(pidfile.read_text().strip()), 0)
            except (OSError, ValueError):
                return True
            return False

        wait_for(redis_gone, 20, "the embedded Redis to exit after its node died")

    def stop(self, timeout: float = 60.0) -> int:
        """Ctrl-C the node and wait for it (and its children) to stop; returns its exit code."""
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self.process = None
        return code

    def jobs(self) -> list[Job]:
        db = StateDB(self.data_dir / "state.db")
        try:
            return db.jobs()
        finally:
            db.close()

    def wait_for_jobs(
        self, count: int, states: set[JobStateValues], timeout: float = 120.0
    ) -> list[Job]:
        """Wait until ``count`` jobs exist and all are in one of ``states``."""

        def settled() -> list[Job] | None:
            jobs = self.jobs()
            if len(jobs) >= count and all(job.state in states for job in jobs):
                return jobs
            return None

        try:
            return wait_for(settled, timeout, f"{count} jobs in states {sorted(states)}")
        except TimeoutError as exc:
            detail = "\n".join(f"{j.id} {j.state} {j.reason}" for j in self.jobs())
            raise TimeoutError(f"{exc}\njobs:\n{detail}\nnode log:\n{self.log()[-6000:]}") from exc

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None:
            self.stop()

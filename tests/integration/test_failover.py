"""Fail-over in a distributed deployment: ``pacsnode run`` with an external Redis and two
``pacsnode worker`` processes. The worker running a job is killed with SIGKILL; its
lease expires within seconds and the node dispatches the job again to the living
worker, so the study comes back in well under two minutes (the broker alone would hold
the task for an hour). A job slower than the lease but alive is not dispatched again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from node.services import find_redis_server
from node.state import JobStateValues
from tests.integration.conftest import CT_RULE, ct_node_config, make_phantom_series
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import StoreSCP, free_port, run_storescu, wait_for, wait_for_port
from tests.standin import STANDIN_MODEL, install_standin
from workers.lease import lease_key

pytestmark = pytest.mark.integration

PACSNODE = str(Path(sys.executable).parent / "pacsnode")
FINISHED = {JobStateValues.DELIVERED, JobStateValues.FAILED}
MODEL_SECONDS = 8.0  # longer than the lease: renewals keep a slow job
LEASE_SECONDS = 3.0


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen(
        [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, timeout=20, what="redis-server", process=server)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.kill()
        server.wait()


def _worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [PACSNODE, "worker", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def test_a_killed_workers_job_goes_to_the_living_worker(
    tmp_path: Path, destination: StoreSCP, redis_url: str
) -> None:
    install_standin(tmp_path / "models", MODEL_SECONDS)
    config = ct_node_config(
        tmp_path / "data", destination, broker=redis_url, models_dir=str(tmp_path / "models"),
        worker={"overlap": False, "lease_seconds": LEASE_SECONDS},
    )  # fmt: skip
    config["rules"] = [dict(CT_RULE, name="standin", models=[STANDIN_MODEL])]
    first = make_phantom_series(tmp_path / "first", "FAILOVER1")
    second = make_phantom_series(tmp_path / "second", "FAILOVER2")
    with NodeProcess(tmp_path, config) as node:
        logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
        workers = [_worker(node.config_path, log) for log in logs]
        try:
            for log in logs:
                wait_for(lambda log=log: "ready." in log.read_text(), 120, f"{log.name} ready")  # type: ignore[misc]
            sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", first)
            assert sent.returncode == 0, sent.stderr

            leases = redis.Redis.from_url(redis_url, decode_responses=True)
            (job,) = node.wait_for_jobs(1, {JobStateValues.RUNNING})
            holder = wait_for(lambda: leases.get(lease_key(job.id)), 30, "the job's lease")
            pid = int(str(holder).rsplit(":", 1)[1])
            (victim,) = [w for w in workers if w.pid == pid]  # the solo pool runs jobs itself
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            killed_at = time.monotonic()

            (job,) = node.wait_for_jobs(1, FINISHED, timeout=120)
            recovered = time.monotonic() - killed_at
            assert job.state == JobStateValues.DELIVERED, job.reason
            assert job.attempts == 2  # dispatched again once, to the living worker
            assert recovered < 120
            assert "lost its worker (lease expired); dispatched again" in node.log()
            assert len(destination.wait_for_files(2)) == 2

            # A job that outlives its lease but renews it runs once.
            sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", second)
            assert sent.returncode == 0, sent.stderr
            jobs = node.wait_for_jobs(2, FINISHED, timeout=120)
            slow = max(jobs, key=lambda j: j.id)
            assert slow.state == JobStateValues.DELIVERED, slow.reason
            assert slow.attempts == 1
            assert slow.started_at is not None
            assert slow.results_at is not None
            assert slow.results_at - slow.started_at > MODEL_SECONDS > LEASE_SECONDS
            assert node.log().count("lost its worker") == 1
        finally:
            for worker in workers:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGTERM)
                    worker.wait(30)

"""The admin commands against a running node: echo, jobs, retry; permanent send failures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from node.state import JobStateValues
from tests.integration.conftest import CT_RULE
from tests.node_process import NODE_AE_TITLE, NodeProcess, node_config
from tests.peers import StoreSCP, free_port, run_storescu, wait_for

pytestmark = pytest.mark.integration

PACSNODE = str(Path(sys.executable).parent / "pacsnode")


def _pacsnode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PACSNODE, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_echo_reports_success_failure_and_unknown_destination(tmp_path: Path) -> None:
    closed_port = free_port()
    with StoreSCP(ae_title="ECHOME") as scp:
        config = node_config(
            tmp_path / "data",
            port=free_port(),
            destinations={
                "up": {"ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port},
                "down": {"ae_title": "NOBODY", "host": "127.0.0.1", "port": closed_port},
            },
            delivery={"network_timeout_seconds": 5},
        )
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        ok = _pacsnode("echo", "up", "--config", str(path))
        assert ok.returncode == 0, ok.stderr
        assert f"C-ECHO to up (ECHOME@127.0.0.1:{scp.port}): success" in ok.stdout
    down = _pacsnode("echo", "down", "--config", str(path))
    assert down.returncode == 1
    assert f"could not associate with NOBODY@127.0.0.1:{closed_port}" in down.stderr
    unknown = _pacsnode("echo", "nope", "--config", str(path))
    assert unknown.returncode == 1
    assert "no destination named 'nope' in config.yaml (defined: down, up)" in unknown.stderr


def test_rejected_destination_fails_the_job_and_retry_delivers(
    tmp_path: Path, phantom_dir: Path
) -> None:
    port = free_port()
    refusing = StoreSCP(ae_title="DESTPACS", port=port, extra_args=["--refuse"])
    refusing.start()
    config = node_config(
        tmp_path / "data",
        port=free_port(),
        destinations={"pacs": {"ae_title": "DESTPACS", "host": "127.0.0.1", "port": port}},
        rules=[CT_RULE],
    )
    try:
        with NodeProcess(tmp_path, config) as node:
            sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", phantom_dir)
            assert sent.returncode == 0, sent.stderr
            (job,) = node.wait_for_jobs(1, {JobStateValues.DELIVERED, JobStateValues.FAILED})
            assert job.state == JobStateValues.FAILED
            assert job.reason is not None
            assert "association permanently rejected by DESTPACS" in job.reason
            deliveries_tried = node.jobs()[0].attempts
            assert deliveries_tried == 1

            listing = _pacsnode("jobs", "--config", str(node.config_path))
            assert listing.returncode == 0
            assert listing.stdout.splitlines()[0].split()[:3] == ["JOB", "REV", "STATE"]
            assert f"{job.id:>5}    1  failed" in listing.stdout
            assert "association permanently rejected" in listing.stdout

            refusing.stop()
            with StoreSCP(ae_title="DESTPACS", port=port) as accepting:
                retried = _pacsnode("retry", str(job.id), "--config", str(node.config_path))
                assert retried.returncode == 0, retried.stderr
                assert f"job {job.id} (ct-tissue) will run again" in retried.stdout
                (job,) = node.wait_for_jobs(1, {JobStateValues.DELIVERED})
                assert len(accepting.wait_for_files(2)) == 2
            delivered = _pacsnode(
                "jobs", "--config", str(node.config_path), "--state", "delivered",
                "--since", "1h", "--study", job.study_instance_uid,
            )  # fmt: skip
            assert delivered.returncode == 0, delivered.stderr
            assert f"{job.id:>5}    1  delivered" in delivered.stdout
            stages = re.search(r"stages: load [\d.]+ s, inference [\d.]+ s, "
                               r"results [\d.]+ s.* \(total [\d.]+ s\)", delivered.stdout)  # fmt: skip
            assert stages is not None, delivered.stdout
            for others in (
                ["--state", "failed"],
                ["--study", "1.2.3.4"],
                ["--since", "2999-01-01"],
            ):
                none = _pacsnode("jobs", "--config", str(node.config_path), *others)
                assert none.stdout.splitlines()[1:] == ["(no jobs match)"], (others, none.stdout)
            again = _pacsnode("retry", "999", "--config", str(node.config_path))
            assert again.returncode == 1
            assert "there is no job 999" in again.stderr
    finally:
        refusing.stop()


def test_ctrl_c_stops_the_node_and_its_children(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, node_config(tmp_path / "data", port=free_port()))
    node.start()
    assert node.process is not None
    pid = node.process.pid

    def children() -> dict[int, str] | None:
        found = subprocess.run(
            ["ps", "-o", "pid=,args=", "--ppid", str(pid)],
            capture_output=True,
            text=True,
            check=False,
        )
        rows = [line.strip().split(maxsplit=1) for line in found.stdout.splitlines()]
        return {int(p): args for p, args in rows} if len(rows) == 2 else None

    started = wait_for(children, 30, "Redis and the worker as children of the node")
    assert sorted("redis-server" in a for a in started.values()) == [False, True]
    assert any("node.cli worker" in a for a in started.values())
    assert node.stop() == 0
    for child in started:
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)

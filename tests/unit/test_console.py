"""The console's actions and probes through its HTTP interface (Starlette's test
client), on a real state DB; the running node is tested in
tests/integration/test_console.py."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from node.config import Config, StorageSettings
from node.console import Console, read_or_create_token
from node.disk_guard import DiskGuard
from node.health import BrokerProbe, BrokerView
from node.state import JobStateValues, PlannedJob, StateDB
from workers.contract import JobRequest, Manifest, ManifestInstance

TOKEN = "s3cret-token"
SERIES = "1.2.3.4"


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.db = StateDB(tmp_path / "state.db")
        self.revoked: list[str] = []
        self.woken = 0
        self.listening = True
        self.probe = BrokerProbe(None, "redis://unused")
        self.probe.view = BrokerView(time.time(), None, {"w@host": time.time()}, {"gpu": 0})
        console = Console(
            config=Config(),
            db=self.db,
            reader=self.db,
            disk_guard=DiskGuard(tmp_path, StorageSettings(min_free_bytes=0)),
            probe=self.probe,
            registry=CollectorRegistry(),
            token=TOKEN,
            scp_listening=lambda: self.listening,
            wake_sender=self._wake,
            revoke=self.revoked.append,
        )
        self.client = TestClient(console.app())

    def _wake(self) -> None:
        self.woken += 1

    def queued_job(self) -> int:
        self.db.record_instance(
            sop_instance_uid="1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            series_instance_uid=SERIES, study_instance_uid="1.2.3", calling_ae_title="SCANNER",
            path=Path("/spool/1.1.dcm"), size=0, sha256="0" * 64,
        )  # fmt: skip
        self.db.mark_series_complete(SERIES)
        (job_id,) = self.db.route_series(SERIES, [PlannedJob("ct-tissue", "r", [], lineage="L")])
        manifest = Manifest(
            series_instance_uid=SERIES,
            instances=(
                ManifestInstance(sop_instance_uid="1.1", path="/x", size=0, sha256="0" * 64),
            ),
        )
        request = JobRequest(job_id=job_id, model="ct-tissue", manifest=manifest, output_dir="/o")
        self.db.mark_job_queued(job_id, "celery-task-7", request)
        return job_id


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_cancel_and_retry_need_the_token_and_change_the_job(harness: Harness) -> None:
    job_id = harness.queued_job()
    client = harness.client
    assert client.get(f"/api/jobs/{job_id}").json()["actions"] == ["cancel"]
    cancel = f"/api/jobs/{job_id}/cancel"
    refused = client.post(cancel)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert client.post(cancel, headers={"Authorization": "Bearer wrong"}).status_code == 403
    job = harness.db.job(job_id)
    assert job is not None
    assert job.state == JobStateValues.QUEUED  # refused: nothing changed
    done = client.post(cancel, headers={"Authorization": f"Bearer {TOKEN}"})
    assert done.json() == {"ok": True, "done": f"job {job_id} (ct-tissue) cancelled"}
    assert harness.revoked == ["celery-task-7"]
    shown = client.get(f"/api/jobs/{job_id}").json()
    assert shown["state"] == "cancelled"
    assert shown["reason"].startswith("cancelled from the console by testclient at ")
    assert shown["actions"] == ["retry"]
    again = client.post(cancel, headers={"Authorization": f"Bearer {TOKEN}"})
    assert again.status_code == 409
    assert again.json()["error"] == f"job {job_id} is cancelled; there is nothing to cancel"
    assert (
        client.post("/api/jobs/99/cancel", headers={"Authorization": f"Bearer {TOKEN}"}).status_code
        == 404
    )

    # A page's button posts a form with the token and comes back to the page.
    retried = client.post(
        f"/api/jobs/{job_id}/retry",
        data={"token": TOKEN, "next": "/failures"},
        follow_redirects=False,
    )
    assert retried.status_code == 303
    assert retried.headers["location"].startswith("/failures?done=job+")
    job = harness.db.job(job_id)
    assert job is not None
    assert job.state == JobStateValues.PENDING
    wrong_form = client.post(f"/api/jobs/{job_id}/retry", data={"token": "x", "next": "/failures"})
    assert wrong_form.status_code == 403
    assert "Refused: wrong token" in wrong_form.text


def test_readyz_names_each_failing_check(harness: Harness) -> None:
    client = harness.client
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["failing"] == []
    harness.listening = False
    harness.probe.view = BrokerView(time.time(), "ConnectionError: refused", {}, {})
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["failing"] == ["broker", "scp", "workers"]
    # A worker seen 20 s ago is not alive, nor one the node saw exit (its own worker,
    # whose name ends in its pid); one running a job (solo pool) counts.
    harness.listening = True
    harness.probe.view = BrokerView(time.time(), None, {"w@host": time.time() - 20}, {})
    assert client.get("/readyz").json()["failing"] == ["workers"]
    harness.probe.view = BrokerView(time.time(), None, {"pacsnode-cpu-41@host": time.time()}, {})
    assert client.get("/readyz").json()["failing"] == []
    harness.probe.forget_worker(41)
    assert client.get("/readyz").json()["failing"] == ["workers"]
    job_id = harness.queued_job()
    harness.db.mark_job_running(job_id)
    assert client.get("/readyz").status_code == 200
    assert client.get("/healthz").json() == {"ok": True}


def test_the_token_file_is_made_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "data" / "console.token"
    token = read_or_create_token(path)
    assert len(token) >= 40
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_or_create_token(path) == token
    path.write_text("\n")
    with pytest.raises(ValueError, match="is empty; delete it"):
        read_or_create_token(path)

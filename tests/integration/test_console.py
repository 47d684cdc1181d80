"""The web console, its JSON API, /metrics and /readyz on a running ``pacsnode run``,
with dcmtk as the scanner and the PACS, a real Redis and a real worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from node.state import JobStateValues
from tests.integration.conftest import CT_RULE, ct_node_config, make_phantom_series
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import StoreSCP, free_port, run_storescu, wait_for

FINISHED = {JobStateValues.DELIVERED, JobStateValues.FAILED}
VIEWER_DIR = Path(__file__).parents[1] / "viewer"


def _send(node: NodeProcess, folder: Path) -> None:
    sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", folder)
    assert sent.returncode == 0, sent.stdout + sent.stderr


def _get(node: NodeProcess, path: str, **params: Any) -> Any:
    response = requests.get(node.console_url + path, params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _metrics(node: NodeProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(node.console_url + "/metrics", timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_console_shows_a_study_its_timeline_and_acts_on_a_failed_delivery(
    tmp_path: Path, destination: StoreSCP, phantom_dir: Path
) -> None:
    """Two studies go through the node; one destination is down, so its deliveries
    fail. The API lists and finds the studies, shows each job's timeline and every
    delivery attempt; /metrics equals the DB; a re-send needs the token and then
    reaches the destination, which is up again."""
    archive_port = free_port()
    config = ct_node_config(tmp_path / "data", destination)
    config["destinations"]["archive"] = {
        "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive_port,
    }  # fmt: skip
    config["rules"] = [{**CT_RULE, "send_to": ["pacs", "archive"]}]
    config["delivery"] = {"first_retry_seconds": 0.5, "give_up_after_seconds": 2.0}
    second = make_phantom_series(tmp_path / "second", "CONSOLE2")
    with NodeProcess(tmp_path, config) as node:
        _send(node, phantom_dir)
        _send(node, second)
        jobs = node.wait_for_jobs(2, FINISHED, timeout=180)
        assert all(job.state == JobStateValues.FAILED for job in jobs), jobs
        assert all("archive" in (job.reason or "") for job in jobs)

        # Local only, and the token file is private.
        assert _listening_addresses(int(node.console_url.rsplit(":", 1)[1])) == {"0100007F"}
        token_file = node.data_dir / "console.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()

        # The studies list, searched by patient ID and by study date.
        found = _get(node, "/api/studies", q="console2")
        assert [s["patient_id"] for s in found["studies"]] == ["CONSOLE2"]
        assert found["studies"][0]["patient_name"] == "Phantom^CONSOLE2"
        assert found["studies"][0]["jobs"] == {"failed": 1}
        everything = _get(node, "/api/studies")
        assert everything["total"] == 2
        date = everything["studies"][0]["study_date"]
        assert _get(node, "/api/studies", date=date)["total"] == 2
        assert _get(node, "/api/studies", date="19000101")["total"] == 0

        # One study: its series with the rule decision, its job with a timeline.
        job = next(
            j for j in jobs if j.study_instance_uid == found["studies"][0]["study_instance_uid"]
        )
        study = _get(node, f"/api/studies/{job.study_instance_uid}")
        assert [(s["instances"], s["state"]) for s in study["series"]] == [(24, "routed")]
        (shown,) = study["jobs"]
        assert shown["id"] == job.id
        stages = [t["stage"] for t in shown["timeline"]]
        assert stages[:5] == ["receiving", "quiet period", "routing", "dispatch", "queue"]
        assert {"load", "model", "write"} <= set(stages)
        assert all(t["seconds"] >= 0 for t in shown["timeline"])
        archive = [d for d in shown["deliveries"] if d["destination"] == "archive"]
        assert len(archive) == 2
        assert all(d["state"] == "failed" for d in archive)
        assert all(len(d["history"]) >= 2 for d in archive)  # retried, then given up
        assert archive[0]["history"][-1]["outcome"] == "failed"
        html = requests.get(f"{node.console_url}/studies/{job.study_instance_uid}", timeout=30)
        assert "Phantom^CONSOLE2" in html.text
        assert 'class="bar timeline"' in html.text

        failures = _get(node, "/api/failures")
        assert {d["id"] for d in failures["deliveries"]} == {
            d["id"] for j in _get(node, "/api/studies")["studies"]
            for d in _get(node, f"/api/jobs/{_job_id(node, j)}")["deliveries"]
            if d["destination"] == "archive"
        }  # fmt: skip

        # /metrics equals the DB.
        metrics = _metrics(node)
        with sqlite3.connect(node.data_dir / "state.db") as db:
            instances = db.execute("SELECT COUNT(*), SUM(size) FROM instances").fetchone()
            by_state = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
            attempts = dict(
                db.execute(
                    "SELECT d.destination || '/' || a.outcome, COUNT(*) FROM delivery_attempts a "
                    "JOIN deliveries d ON d.id = a.delivery_id GROUP BY 1"
                )
            )
        scanner = (("calling_ae", "SCANNER"),)
        assert metrics["pacsnode_instances_received_total", scanner] == instances[0] == 48
        assert metrics["pacsnode_received_bytes_total", scanner] == instances[1]
        assert metrics["pacsnode_associations_total", (*scanner, ("outcome", "accepted"))] == 2
        assert set(by_state) == {"failed"}  # both jobs, by their deliveries
        for state, count in by_state.items():
            labels = (("model", "ct-tissue"), ("state", state))
            assert metrics["pacsnode_jobs_total", labels] == count
        for key, count in attempts.items():
            destination_name, outcome = key.split("/")
            labels = (("destination", destination_name), ("outcome", outcome))
            assert metrics["pacsnode_delivery_attempts_total", labels] == count
        for stage in ("receive_to_complete", "queue_wait", "inference", "results", "end_to_end"):
            labels = (("model", "ct-tissue"), ("stage", stage))
            assert metrics["pacsnode_stage_seconds_count", labels] == 2, stage
            assert metrics["pacsnode_stage_seconds_sum", labels] > 0, stage

        with StoreSCP(ae_title="ARCHIVE", port=archive_port) as archive_scp:
            # In a browser: the pages, then a re-send by its button (token asked for).
            seen = _browse(node, job.study_instance_uid, archive[0]["id"], token, tmp_path)
            assert seen["errors"] == []
            assert seen["dashboard"]["studiesToday"] == "2"
            assert seen["dashboard"]["instancesToday"] == "48"
            assert "failed" in seen["dashboard"]["jobsByState"]
            assert "SCANNER" in seen["dashboard"]["peers"]
            assert seen["studies"] == 2
            assert "Phantom^CONSOLE2" in seen["study"]["heading"]
            assert [t.split(":")[0] for t in seen["study"]["timelineStages"]] == stages
            # One 96x96 key image per segment found, side by side, outlines in colour.
            width, height = seen["study"]["preview"]
            assert height == 96
            assert width % 100 == 0
            assert width >= 200
            png = requests.get(f"{node.console_url}/jobs/{job.id}/preview.png", timeout=30)
            rgb = np.asarray(Image.open(BytesIO(png.content)).convert("RGB")).astype(int)
            assert rgb.shape == (96, width, 3)
            assert np.count_nonzero(np.ptp(rgb, axis=2) > 60) > 50  # coloured outline pixels
            assert seen["failedDeliveries"] == 4
            assert seen["wrongToken"]["status"] == 403
            assert "Refused: wrong token" in seen["wrongToken"]["body"]
            assert seen["rightToken"]["status"] == 200
            assert seen["rightToken"]["url"].startswith(f"{node.console_url}/failures?done=")
            assert f"delivery {archive[0]['id']}" in seen["rightToken"]["body"]

            # By the API: without the token, with a wrong one, with the right one.
            url = f"{node.console_url}/api/deliveries/{archive[1]['id']}/resend"
            assert requests.post(url, timeout=30).status_code == 401
            wrong = {"Authorization": "Bearer not-the-token"}
            assert requests.post(url, headers=wrong, timeout=30).status_code == 403
            right = {"Authorization": f"Bearer {token}"}
            response = requests.post(url, headers=right, timeout=30)
            assert response.status_code == 200, response.text
            assert requests.post(url, headers=right, timeout=30).status_code in (200, 409)

            received = archive_scp.wait_for_files(2)
            assert job.result is not None
            assert {dcmread(p).SOPInstanceUID for p in received} == {
                f.sop_instance_uid for f in job.result.files
            }
            wait_for(
                lambda: _get(node, f"/api/jobs/{job.id}")["state"] == "delivered",
                30,
                "the job delivered after the re-send",
            )
        detail = _get(node, f"/api/jobs/{job.id}")
        history = next(d for d in detail["deliveries"] if d["id"] == archive[0]["id"])["history"]
        assert [a["outcome"] for a in history][-2:] == ["resend", "delivered"]
        assert "console" in history[-2]["reason"]
        assert "console: re-send by 127.0.0.1" in node.log()
        # The audit trail has each re-send, by the console from 127.0.0.1, and the refusals.
        audit = [json.loads(line) for line in
                 (node.data_dir / "audit" / "audit.jsonl").read_text().splitlines()]  # fmt: skip
        resends = [a for a in audit if a["EventID"]["csd-code"] == "110103"]
        assert len(resends) == 2
        assert {a["ActiveParticipant"][0]["NetworkAccessPointID"] for a in resends} == {"127.0.0.1"}
        assert {
            a["ParticipantObjectIdentification"][0]["ParticipantObjectID"] for a in resends
        } == {job.study_instance_uid}
        refusals = [a for a in audit if a["EventID"]["csd-code"] == "110113"]
        assert len(refusals) == 2  # the wrong token, in the browser and by the API


def _browse(
    node: NodeProcess, study_uid: str, delivery_id: int, token: str, out: Path
) -> dict[str, Any]:
    """tests/viewer/console.mjs in Debian's headless chromium; screenshots go to
    ``out`` (and to $PACSNODE_CONSOLE_SCREENSHOTS, for the README, when set)."""
    run = subprocess.run(
        ["node", "console.mjs", node.console_url, study_uid, str(delivery_id), token, str(out)],
        cwd=VIEWER_DIR, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    shots = os.environ.get("PACSNODE_CONSOLE_SCREENSHOTS")
    if shots:
        for name in ("dashboard.png", "study.png"):
            shutil.copy(out / name, Path(shots) / f"console-{name}")
    seen: dict[str, Any] = json.loads(run.stdout)
    return seen


def _job_id(node: NodeProcess, study: dict[str, Any]) -> int:
    return int(_get(node, f"/api/studies/{study['study_instance_uid']}")["jobs"][0]["id"])


def test_readyz_follows_the_worker_and_the_broker(tmp_path: Path, destination: StoreSCP) -> None:
    """/readyz is 200 with a worker alive, 503 naming ``workers`` while the worker is
    dead, 200 again once the node restarted it, and 503 naming ``broker`` when Redis is
    gone; /healthz answers throughout."""
    with NodeProcess(tmp_path, ct_node_config(tmp_path / "data", destination)) as node:
        ready = f"{node.console_url}/readyz"

        def status(expected: int, failing: list[str]) -> bool:
            response = requests.get(ready, timeout=30)
            return response.status_code == expected and response.json()["failing"] == failing

        wait_for(lambda: status(200, []), 90, "/readyz 200")
        body = requests.get(ready, timeout=30).json()
        assert body["checks"]["disk"]["ok"]
        assert body["checks"]["state_db"]["ok"]
        assert body["checks"]["workers"]["alive"]
        node.kill_worker()
        wait_for(lambda: status(503, ["workers"]), 30, "/readyz 503 without a worker")
        wait_for(lambda: status(200, []), 120, "/readyz 200 once the worker is back")
        pid = int((node.data_dir / "redis" / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: "broker" in requests.get(ready, timeout=30).json()["failing"],
            30,
            "/readyz naming the broker",
        )
        assert requests.get(ready, timeout=30).status_code == 503
        assert requests.get(f"{node.console_url}/healthz", timeout=30).status_code == 200

"""The audit trail of a running node: who associated or was refused, the study received,
each result sent, an admin's retry, start and stop, in the file (which survives a
SIGKILL) and on a syslog receiver (UDP), read back by ``pacsnode audit --study``."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydicom import dcmread

from node.state import JobStateValues
from tests.integration.conftest import ct_node_config
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import StoreSCP, dcmtk_env, run_storescu, wait_for

PACSNODE = str(Path(sys.executable).parent / "pacsnode")
FINISHED = {JobStateValues.DELIVERED, JobStateValues.FAILED}


def _events(
    entries: list[dict[str, Any]], code: str, action: str | None = None
) -> list[dict[str, Any]]:
    return [
        e for e in entries
        if e["EventID"]["csd-code"] == code and (action is None or e["EventActionCode"] == action)
    ]  # fmt: skip


def test_the_audit_trail_records_who_sent_and_received_what(
    tmp_path: Path, destination: StoreSCP, phantom_dir: Path
) -> None:
    syslog = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    syslog.bind(("127.0.0.1", 0))
    syslog.settimeout(0.2)
    config = ct_node_config(tmp_path / "data", destination)
    config["audit"] = {"syslog": f"udp://127.0.0.1:{syslog.getsockname()[1]}"}
    node = NodeProcess(tmp_path, config)
    node.start()
    sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", phantom_dir)
    assert sent.returncode == 0, sent.stderr
    stranger = subprocess.run(
        ["/usr/bin/echoscu", "-aet", "STRANGER", "-aec", NODE_AE_TITLE, "127.0.0.1", str(node.port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert stranger.returncode != 0
    (job,) = node.wait_for_jobs(1, FINISHED)
    assert job.state == JobStateValues.DELIVERED, job.reason
    received = destination.wait_for_files(2)
    retry = subprocess.run(
        [PACSNODE, "retry", str(job.id), "--config", str(node.config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert retry.returncode == 0, retry.stderr
    first_results = job.results_at
    assert first_results is not None
    wait_for(
        lambda: any(j.state == JobStateValues.DELIVERED and (j.results_at or 0) > first_results
                    for j in node.jobs()),
        120, "the retried job delivered again",
    )  # fmt: skip
    node.kill()  # SIGKILL: what was recorded is on disk

    lines = (node.data_dir / "audit" / "audit.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line whole
    study = job.study_instance_uid

    (start,) = _events(entries, "110100")
    assert start["EventTypeCode"][0]["originalText"] == "Application Start"
    digest = hashlib.sha256(node.config_path.read_bytes()).hexdigest()
    assert start["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"] == {
        "ConfigurationSHA256": digest
    }
    logins = _events(entries, "110114")
    accepted = [e for e in logins if e["EventOutcomeIndicator"] == 0]
    refused = [e for e in logins if e["EventOutcomeIndicator"] == 4]
    assert {e["ActiveParticipant"][0]["UserID"] for e in accepted} == {"SCANNER"}
    assert [e["ActiveParticipant"][0]["UserID"] for e in refused] == ["STRANGER"]
    assert refused[0]["ActiveParticipant"][0]["NetworkAccessPointID"] == "127.0.0.1"
    assert "unknown peer" in refused[0]["EventOutcomeDescription"]

    (arrived,) = _events(entries, "110104", "C")
    assert arrived["ParticipantObjectIdentification"] == [{
        "ParticipantObjectID": study, "ParticipantObjectTypeCode": 2,
        "ParticipantObjectTypeCodeRole": 3,
        "ParticipantObjectIDTypeCode": {"csd-code": "110180", "codeSystemName": "DCM",
                                        "originalText": "Study Instance UID"},
        "ParticipantObjectDetail": {"NumberOfInstances": len(list(phantom_dir.glob("*.dcm")))},
    }]  # fmt: skip
    assert [p["UserID"] for p in arrived["ActiveParticipant"]] == ["SCANNER", NODE_AE_TITLE]

    sent_out = _events(entries, "110104", "R")
    assert len(sent_out) == 4  # SEG and SR, before and after the retry
    assert all(e["EventOutcomeIndicator"] == 0 for e in sent_out)
    sop_uids = {e["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]["SOPInstanceUID"]
                for e in sent_out}  # fmt: skip
    assert {str(dcmread(p).SOPInstanceUID) for p in received} <= sop_uids
    assert {e["ActiveParticipant"][1]["UserID"] for e in sent_out} == {destination.ae_title}

    (retried,) = _events(entries, "110103", "U")
    assert retried["ActiveParticipant"][0]["UserID"].startswith("cli:")
    assert retried["EventOutcomeDescription"].startswith(f"retry: job {job.id}")

    # Every record also went to syslog as an RFC 5424 message.
    messages = []
    while True:
        try:
            messages.append(syslog.recv(65536).decode())
        except TimeoutError:
            break
    syslog.close()
    assert len(messages) == len(entries)  # the CLI's retry too
    for message in messages:
        header, payload = message.split(" - ", 1)
        assert header.startswith("<10")  # facility 13 (log audit) * 8 + severity 4 or 5
        assert " pacsnode " in header
        assert "DICOM+RFC3881" in header
        assert json.loads(payload) in entries

    # The study's trail, as an admin reads it.
    trail = subprocess.run(
        [PACSNODE, "audit", "--study", study, "--config", str(node.config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert trail.returncode == 0, trail.stderr
    out = trail.stdout.splitlines()
    assert len(out) == 1 + len(sent_out) + 1  # received, each sent, the retry
    assert "DICOM Instances Transferred [C] ok  SCANNER (Source), PACSNODE (Destination)" in out[0]
    assert "NumberOfInstances=24" in out[0]
    assert any("DICOM Instances Accessed [U] ok  cli:" in line for line in out)

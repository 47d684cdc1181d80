"""The audit trail's file: one JSON record per line, rotated by size, read back by study."""

from __future__ import annotations

import json
from pathlib import Path

from node.audit import INSTANCES_TRANSFERRED, AuditLog, StudyObject, read_trail
from node.config import AuditSettings


def test_records_rotate_by_size_and_read_back_in_order(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path, AuditSettings(max_bytes=4096, keep_files=3))
    for n in range(100):
        audit.record(INSTANCES_TRANSFERRED, action="C", objects=[StudyObject(f"1.2.{n % 2}", N=n)])
    audit.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= 4096
        assert path.stat().st_mode & 0o777 == 0o600
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            assert entry["EventID"] == {
                "csd-code": "110104", "codeSystemName": "DCM",
                "originalText": "DICOM Instances Transferred",
            }  # fmt: skip
    # The oldest records went with the oldest file; the rest read back oldest first.
    kept = [e["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]["N"]
            for e in read_trail(tmp_path, "1.2.1")]  # fmt: skip
    assert kept == sorted(kept)
    assert kept[-1] == 99
    assert all(n % 2 == 1 for n in kept)
    assert 0 < len(kept) < 50


def test_another_process_appends_without_rotating(tmp_path: Path) -> None:
    node = AuditLog(tmp_path, AuditSettings(max_bytes=4096))
    cli = AuditLog(tmp_path, AuditSettings(max_bytes=4096), rotate=False)
    for n in range(40):
        cli.record(INSTANCES_TRANSFERRED, objects=[StudyObject("9.9", N=n)])
    assert not (tmp_path / "audit.jsonl.1").exists()  # only the node rotates
    node.record(INSTANCES_TRANSFERRED, objects=[StudyObject("9.9", N=40)])
    assert (tmp_path / "audit.jsonl.1").exists()
    node.close()
    cli.close()
    assert [e["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]["N"]
            for e in read_trail(tmp_path, "9.9")] == list(range(41))  # fmt: skip

"""``pacsnode rules test`` as an admin runs it: the console script on DICOM files on disk
and on studies recorded in a node's state DB, which it must leave as it found it."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydicom import dcmread

from node.state import StateDB
from tests.dicom_factory import write_ct_series
from tests.integration.conftest import make_phantom_series
from tests.node_process import node_config

pytestmark = pytest.mark.integration

PACSNODE = str(Path(sys.executable).parent / "pacsnode")

RULES: list[dict[str, Any]] = [
    {
        "name": "ct-chest",
        "match": {
            "Modality": "CT",
            "SeriesDescription": {"regex": "(?i)chest"},
            "min_instances": 10,
        },
        "models": ["ct-tissue"],
        "send_to": ["pacs"],
    },
    {"name": "mr-brain", "match": {"Modality": "MR"}, "models": ["mr-brain-mask"]},
    {
        "name": "thin-ct",
        "match": {"Modality": "CT", "SliceThickness": {"max": 3}},
        "models": ["mr-brain-mask"],
    },
]


def _pacsnode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PACSNODE, *args], capture_output=True, text=True, timeout=120, check=False
    )


def _write_config(tmp_path: Path) -> Path:
    config = node_config(
        tmp_path / "data",
        port=11112,
        destinations={"pacs": {"ae_title": "DESTPACS", "host": "127.0.0.1", "port": 104}},
        rules=RULES,
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _uids(path: Path) -> tuple[str, str]:
    header = dcmread(path, stop_before_pixels=True)
    return str(header.StudyInstanceUID), str(header.SeriesInstanceUID)


@dataclass(frozen=True)
class Study:
    """One study on disk: a chest phantom, a thin derived recon, a head series, a scout."""

    uid: str
    chest: list[Path]
    recon: list[Path]
    head: list[Path]
    scout: list[Path]

    def series_uid(self, paths: list[Path]) -> str:
        return _uids(paths[0])[1]


def _write_study(folder: Path) -> Study:
    chest_dir = make_phantom_series(folder / "1-chest", "PHANTOM1")
    chest = sorted(chest_dir.glob("*.dcm"))
    study_uid = _uids(chest[0])[0]

    def extra(name: str, slices: int, thickness: float, **kwargs: Any) -> list[Path]:
        return write_ct_series(
            np.full((slices, 16, 16), -1000, dtype=np.int16),
            folder / name,
            spacing_mm=(thickness, 2.0, 2.0),
            patient_id="PHANTOM1",
            study_instance_uid=study_uid,
            **kwargs,
        )

    recon = extra(
        "2-recon",
        12,
        2.0,
        series_number=2,
        series_description="Chest 2mm",
        image_type=("DERIVED", "SECONDARY", "AXIAL"),
    )
    head = extra("3-head", 12, 5.0, series_number=3, series_description="HEAD 5mm")
    scout = extra(
        "4-scout",
        2,
        5.0,
        series_number=4,
        series_description="Scout",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    return Study(study_uid, chest, recon, head, scout)


def _expected_lines(study: Study, series: list[str]) -> list[str]:
    """The report on ``study`` for the named series, in that order."""
    chest = study.series_uid(study.chest)
    blocks = {
        "chest": [
            f'  series {chest}  CT  "Synthetic chest phantom"  24 instances',
            "    rule ct-chest: matches",
            "    rule mr-brain: no — Modality: expected 'MR', found 'CT'",
            "    rule thin-ct: no — SliceThickness: found '5', above the maximum 3",
            "    model ct-tissue: would run (rules ct-chest; send to pacs)",
        ],
        "recon": [
            f'  series {study.series_uid(study.recon)}  CT  "Chest 2mm"  12 instances',
            "    rule ct-chest: matches",
            "    rule mr-brain: no — Modality: expected 'MR', found 'CT'",
            "    rule thin-ct: matches",
            (
                f"    model ct-tissue: skipped — series {chest} of the same study fits the model "
                "better"
            ),
            "    model mr-brain-mask: skipped — modality CT, the model takes MR",
        ],
        "head": [
            f'  series {study.series_uid(study.head)}  CT  "HEAD 5mm"  12 instances',
            (
                '    rule ct-chest: no — SeriesDescription: {regex: "(?i)chest"} did not match '
                "'HEAD 5mm'"
            ),
            "    rule mr-brain: no — Modality: expected 'MR', found 'CT'",
            "    rule thin-ct: no — SliceThickness: found '5', above the maximum 3",
            "    ignored: no rule matches",
        ],
        "scout": [
            f'  series {study.series_uid(study.scout)}  CT  "Scout"  2 instances',
            "    rule ct-chest: no — min_instances: needs 10, the series has 2",
            "    rule mr-brain: no — Modality: expected 'MR', found 'CT'",
            "    rule thin-ct: no — SliceThickness: found '5', above the maximum 3",
            "    ignored: no rule matches",
        ],
    }
    lines = [f"study {study.uid} (PatientID PHANTOM1, {len(series)} series)"]
    for name in series:
        lines.extend(blocks[name])
    return lines


def test_rules_test_on_files(tmp_path: Path) -> None:
    config = _write_config(tmp_path)
    study = _write_study(tmp_path / "files")
    (tmp_path / "files" / "notes.txt").write_text("not DICOM")

    result = _pacsnode("rules", "test", "--config", str(config), str(tmp_path / "files"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == _expected_lines(study, ["chest", "recon", "head", "scout"])
    assert "passed over 1 file: not DICOM, or no study or series UID" in result.stderr

    # Single files are taken too; the scout alone is a study of one ignored series.
    scout = _pacsnode("rules", "test", "--config", str(config), *map(str, study.scout))
    assert scout.returncode == 0, scout.stderr
    expected = _expected_lines(study, ["scout"])
    assert scout.stdout.splitlines() == expected


def test_rules_test_finds_nothing_or_refuses_a_bad_config(tmp_path: Path) -> None:
    config = _write_config(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = _pacsnode("rules", "test", "--config", str(config), str(empty))
    assert nothing.returncode == 1
    assert nothing.stdout == ""
    assert f"no DICOM series found in {empty}" in nothing.stderr

    missing = _pacsnode("rules", "test", "--config", str(config), str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert f"no such file or folder: {tmp_path / 'nope'}" in missing.stderr

    no_db = _pacsnode("rules", "test", "--config", str(config), "--study", "1.2.3")
    assert no_db.returncode == 1
    assert f"no state DB at {tmp_path / 'data' / 'state.db'}" in no_db.stderr
    assert not (tmp_path / "data").exists()  # nothing was created

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rules": [{"name": "x", "models": ["no-such-model"]}]}))
    refused = _pacsnode("rules", "test", "--config", str(bad), str(empty))
    assert refused.returncode == 2
    assert "rules[0].models: rule 'x' names model 'no-such-model'" in refused.stderr

    usage = _pacsnode("rules", "test", "--config", str(config), "--since", "2 days")
    assert usage.returncode == 2
    assert "'2 days' is not a duration" in usage.stderr


def _record(db: StateDB, paths: list[Path], received_at: float) -> None:
    for path in paths:
        header = dcmread(path, stop_before_pixels=True)
        data = path.read_bytes()
        db.record_instance(
            sop_instance_uid=str(header.SOPInstanceUID),
            sop_class_uid=str(header.SOPClassUID),
            series_instance_uid=str(header.SeriesInstanceUID),
            study_instance_uid=str(header.StudyInstanceUID),
            calling_ae_title="SCANNER",
            path=path,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            received_at=received_at,
        )


def _dump(db_path: Path) -> list[str]:
    """Every row and table definition of the DB, read through a read-only connection."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def test_rules_test_on_received_studies(tmp_path: Path) -> None:
    config = _write_config(tmp_path)
    study = _write_study(tmp_path / "spool")
    old = write_ct_series(
        np.full((12, 16, 16), -1000, dtype=np.int16),
        tmp_path / "spool" / "old",
        spacing_mm=(5.0, 2.0, 2.0),
        patient_id="OLD1",
        series_description="Old chest",
    )
    old_study, old_series = _uids(old[0])
    db_path = tmp_path / "data" / "state.db"
    db = StateDB(db_path)
    now = time.time()
    _record(db, old, now - 7200)
    # Received in this order (the report follows it): chest, recon, scout; no head.
    for offset, paths in enumerate([study.chest, study.recon, study.scout]):
        _record(db, paths, now - 60 + offset)
    db.close()
    before = _dump(db_path)
    before_bytes = db_path.read_bytes()

    by_study = _pacsnode("rules", "test", "--config", str(config), "--study", study.uid)
    assert by_study.returncode == 0, by_study.stderr
    assert by_study.stdout.splitlines() == _expected_lines(study, ["chest", "recon", "scout"])

    recent = _pacsnode("rules", "test", "--config", str(config), "--since", "1h")
    assert recent.returncode == 0, recent.stderr
    assert recent.stdout == by_study.stdout

    both = _pacsnode("rules", "test", "--config", str(config), "--since", "3h")
    assert both.returncode == 0, both.stderr
    assert both.stdout.splitlines() == [
        f"study {old_study} (PatientID OLD1, 1 series)",
        f'  series {old_series}  CT  "Old chest"  12 instances',
        "    rule ct-chest: matches",
        "    rule mr-brain: no — Modality: expected 'MR', found 'CT'",
        "    rule thin-ct: no — SliceThickness: found '5', above the maximum 3",
        "    model ct-tissue: would run (rules ct-chest; send to pacs)",
        "",
        *_expected_lines(study, ["chest", "recon", "scout"]),
    ]

    unknown = _pacsnode("rules", "test", "--config", str(config), "--study", "1.2.3.999")
    assert unknown.returncode == 1
    assert unknown.stdout == ""
    assert f"no study 1.2.3.999 in {db_path}" in unknown.stderr

    none_recent = _pacsnode("rules", "test", "--config", str(config), "--since", "30s")
    assert none_recent.returncode == 1
    assert f"no study received in the last 30s ({db_path})" in none_recent.stderr

    # A dry run: no series routed, no job created, nothing else written.
    assert _dump(db_path) == before
    assert db_path.read_bytes() == before_bytes
    db = StateDB(db_path)
    try:
        assert db.jobs() == []
        assert {s.state for s in db.series_of_study(study.uid)} == {"receiving"}
    finally:
        db.close()

"""The spool: atomic writes, UID checks, recovery of files the DB missed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from node.app import recover_spool
from node.spool import InvalidUIDError, Spool, check_uid
from node.state import StateDB
from tests.dicom_factory import write_ct_series
from workers.contract import file_digest


@pytest.mark.parametrize(
    "bad",
    ["", "1.2.", ".1.2", "1..2", "1.02", "1.2.a", "../../etc/passwd", "1/2", "1." + "1" * 63],
)
def test_invalid_uids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidUIDError, match="is not a valid DICOM UID"):
        check_uid(bad, "SOPInstanceUID")


def test_valid_uid_passes_with_padding_removed() -> None:
    assert check_uid("1.2.840.10008.0.1\x00", "SOPClassUID") == "1.2.840.10008.0.1"


def test_write_is_whole_and_leaves_nothing_behind(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    written = spool.write(
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        sop_instance_uid="1.2.3.4",
        file_meta=b"META",
        dataset=memoryview(b"DATA"),
    )
    expected = b"\x00" * 128 + b"DICM" + b"METADATA"
    digest = hashlib.sha256(expected).hexdigest()
    assert written.path == tmp_path / "spool" / "1.2" / "1.2.3" / f"1.2.3.4_{digest[:16]}.dcm"
    assert written.path.read_bytes() == expected
    assert (written.size, written.sha256) == (len(expected), hashlib.sha256(expected).hexdigest())
    assert file_digest(written.path) == (written.size, written.sha256)
    assert list(spool.incoming.iterdir()) == []


def test_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidUIDError):
        spool.write(
            study_instance_uid="1.2",
            series_instance_uid="1.2.3",
            sop_instance_uid="not-a-uid",
            file_meta=b"",
            dataset=b"",
        )
    (spool.root / "1.2").mkdir()
    (spool.root / "1.2" / "1.2.3").write_text("a file where the series folder should be")
    with pytest.raises(FileExistsError, match=r"1\.2\.3"):
        spool.write(
            study_instance_uid="1.2",
            series_instance_uid="1.2.3",
            sop_instance_uid="1.2.3.4",
            file_meta=b"",
            dataset=b"x",
        )
    assert list(spool.incoming.iterdir()) == []


def test_recover_spool_records_what_the_db_missed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    db = StateDB(tmp_path / "state.db")
    files = write_ct_series(np.zeros((3, 8, 8), np.int16), tmp_path / "ct", spacing_mm=(1, 1, 1))
    from pydicom import dcmread

    for source in files:
        ds = dcmread(source)
        sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
        target = spool.path_for(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, sha256
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    (spool.incoming / "abc.part").write_bytes(b"half")
    assert recover_spool(spool, db) == 3
    assert recover_spool(spool, db) == 0
    assert list(spool.incoming.iterdir()) == []
    series_uid = dcmread(files[0]).SeriesInstanceUID
    assert db.instance_count(series_uid) == 3
    manifest = db.manifest(series_uid)
    assert manifest is not None
    assert sorted(i.sha256 for i in manifest.instances) == sorted(
        hashlib.sha256(f.read_bytes()).hexdigest() for f in files
    )


def test_identical_resend_is_not_written_again_and_a_changed_one_has_its_own_file(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    uids = {"study_instance_uid": "1.2", "series_instance_uid": "1.2.3", "sop_instance_uid": "1.4"}
    first = spool.write(**uids, file_meta=b"META", dataset=b"DATA")
    inode = first.path.stat().st_ino
    again = spool.write(**uids, file_meta=b"META", dataset=b"DATA")
    assert again == first
    assert first.path.stat().st_ino == inode  # untouched
    changed = spool.write(**uids, file_meta=b"META", dataset=b"ATAD")
    assert changed.sha256 != first.sha256
    assert changed.path.parent == first.path.parent
    assert changed.path != first.path
    assert changed.path.read_bytes().endswith(b"METAATAD")
    assert first.path.read_bytes().endswith(b"METADATA")  # a manifest may still name it
    assert {i.sop_instance_uid for i in spool.scan()} == {"1.4"}

"""The real peers of tests/peers.py: dcmtk storescu/storescp, Orthanc and dciodvfy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from tests.dicom_factory import write_ct_series
from tests.peers import (
    Orthanc,
    StoreSCP,
    build_storescu_command,
    dciodvfy_errors,
    free_port,
    run_storescu,
    wait_for,
    wait_for_port,
)

pytestmark = pytest.mark.integration

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _ct(
    out_dir: Path, n_slices: int = 2, transfer_syntax: str = ExplicitVRLittleEndian
) -> list[Path]:
    """A tiny valid CT series, one file per slice."""
    hu = np.arange(n_slices * 32 * 32, dtype=np.int16).reshape(n_slices, 32, 32) - 1000
    return write_ct_series(hu, out_dir, spacing_mm=(2.0, 0.8, 0.8), transfer_syntax=transfer_syntax)


def _sop_instance_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_storescu_delivers_a_folder_to_storescp(tmp_path: Path) -> None:
    sent = _ct(tmp_path / "ct", n_slices=3)
    with StoreSCP("PEER") as scp:
        result = run_storescu("127.0.0.1", scp.port, scp.ae_title, "SCANNER", tmp_path / "ct")
        assert result.returncode == 0, result.stderr
        received = scp.received()
        assert len(received) == 3
        assert _sop_instance_uids(received) == _sop_instance_uids(sent)
        assert all(p.name.startswith("CT.") for p in received)
        assert dciodvfy_errors(received[0]) == []


def test_storescu_sends_compressed_files_in_their_own_transfer_syntax(tmp_path: Path) -> None:
    files = [
        *_ct(tmp_path / "j2k", n_slices=1, transfer_syntax=JPEG2000Lossless),
        *_ct(tmp_path / "rle", n_slices=1, transfer_syntax=RLELossless),
        *_ct(tmp_path / "raw", n_slices=1),
    ]
    with StoreSCP("PEER") as scp:
        result = run_storescu("127.0.0.1", scp.port, "PEER", "SCANNER", files, check=True)
        assert result.returncode == 0
        received = {
            str(ds.SOPInstanceUID): str(ds.file_meta.TransferSyntaxUID)
            for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in scp.received())
        }
    expected = {
        str(ds.SOPInstanceUID): str(ds.file_meta.TransferSyntaxUID)
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in files)
    }
    assert received == expected


def test_storescp_accepts_seg_and_comprehensive_3d_sr(tmp_path: Path) -> None:
    """SEG and 3D SR are what pacsnode sends back; the stand-in PACS must take them."""
    source = pydicom.dcmread(_ct(tmp_path / "ct", n_slices=1)[0])
    files = []
    for sop_class in ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"):
        ds = source.copy()
        ds.SOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID(sop_class)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        path = tmp_path / f"{sop_class}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    with StoreSCP("PEER") as scp:
        result = run_storescu("127.0.0.1", scp.port, "PEER", "SCANNER", files)
        assert result.returncode == 0, result.stderr
        assert {p.name.split(".")[0] for p in scp.received()} == {"SG", "SR3"}


def test_storescp_stops_and_starts_again_on_the_same_port(tmp_path: Path) -> None:
    first, second = _ct(tmp_path / "a", n_slices=1), _ct(tmp_path / "b", n_slices=1)
    (tmp_path / "out").mkdir()
    with StoreSCP("PEER", tmp_path / "out") as scp:
        port = scp.port
        assert run_storescu("127.0.0.1", port, "PEER", "SCANNER", first).returncode == 0
        scp.stop()
        assert not scp.running
        down = run_storescu("127.0.0.1", port, "PEER", "SCANNER", second, timeout=30)
        assert down.returncode != 0
        scp.start()
        assert scp.port == port
        assert run_storescu("127.0.0.1", port, "PEER", "SCANNER", second).returncode == 0
        assert len(scp.received()) == 2
    # A folder the caller gave survives the context.
    assert len(list((tmp_path / "out").iterdir())) == 2


def test_orthanc_forwards_an_upload_to_storescp(tmp_path: Path) -> None:
    files = _ct(tmp_path / "ct", n_slices=2)
    with (
        StoreSCP("PACS") as scp,
        Orthanc("ORTHANC", {"pacs": ("PACS", "127.0.0.1", scp.port)}) as orthanc,
    ):
        ids = [orthanc.upload(p)["ID"] for p in files]
        assert sorted(orthanc.instances()) == sorted(ids)
        (series,) = orthanc.series()
        assert sorted(series["Instances"]) == sorted(ids)
        assert len(orthanc.find_instances_by_sop_class(CT_IMAGE_STORAGE)) == 2
        assert orthanc.find_instances_by_sop_class("1.2.840.10008.5.1.4.1.1.66.4") == []
        assert orthanc.get_file(ids[0])[128:132] == b"DICM"

        answer = orthanc.send_to_modality("pacs", [series["ID"]])
        assert answer["FailedInstancesCount"] == 0
        assert _sop_instance_uids(scp.received()) == _sop_instance_uids(files)


def test_storescu_stores_into_orthanc_and_orthanc_learns_modalities(tmp_path: Path) -> None:
    files = _ct(tmp_path / "ct", n_slices=2)
    with Orthanc("ORTHANC") as orthanc, StoreSCP("LATE") as scp:
        result = run_storescu("127.0.0.1", orthanc.dicom_port, "ORTHANC", "SCANNER", files)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: len(orthanc.instances()) == 2, 10, "2 instances in Orthanc")
        orthanc.add_modality("late", "LATE", "127.0.0.1", scp.port)
        orthanc.send_to_modality("late", orthanc.instances())
        assert len(scp.received()) == 2


def test_orthanc_reports_a_refused_association(tmp_path: Path) -> None:
    files = _ct(tmp_path / "ct", n_slices=1)
    with (
        StoreSCP("PACS", extra_args=["--refuse"]) as scp,
        Orthanc(modalities={"pacs": ("PACS", "127.0.0.1", scp.port)}) as orthanc,
    ):
        instance_id = orthanc.upload(files[0])["ID"]
        with pytest.raises(RuntimeError, match="modalities/pacs/store"):
            orthanc.send_to_modality("pacs", [instance_id])


def test_wait_helpers_name_what_they_waited_for() -> None:
    port = free_port()
    with pytest.raises(TimeoutError, match=rf"for storescp X to listen on 127\.0\.0\.1:{port}"):
        wait_for_port(port, timeout=0.2, what="storescp X")
    with pytest.raises(TimeoutError, match="waiting for the impossible"):
        wait_for(lambda: False, 0.1, "the impossible")
    sleeper = subprocess.Popen(["/bin/true"])
    sleeper.wait()
    with pytest.raises(RuntimeError, match="exited with status 0"):
        wait_for_port(port, timeout=5, what="true", process=sleeper)


def test_storescu_command_refuses_a_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "note.txt").write_text("not DICOM")
    with pytest.raises(ValueError, match="must hold DICOM files"):
        build_storescu_command("127.0.0.1", 104, "A", "B", tmp_path, config_dir=tmp_path)


def test_dciodvfy_reports_errors(tmp_path: Path) -> None:
    path = _ct(tmp_path / "ct", n_slices=1)[0]
    ds = pydicom.dcmread(path)
    del ds.PatientSex  # Type 2 in the Patient module
    ds.save_as(path, enforce_file_format=True)
    errors = dciodvfy_errors(path)
    assert errors
    assert any("PatientSex" in line for line in errors)
    with pytest.raises(FileNotFoundError, match="existing DICOM file"):
        dciodvfy_errors(tmp_path / "missing.dcm")

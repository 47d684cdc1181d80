"""Studies as they really arrive: late instances and series, re-sends, completion on
evidence, against dcmtk storescu/storescp and Orthanc (issue #8).

Every result a destination receives is identified by its UIDs; a later version must
come under new UIDs, name its predecessor and cover exactly its own input.
"""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid
from pynetdicom import AE

from models.ct_tissue import CtTissueModel
from node.state import JobStateValues, SeriesStateValues, StateDB
from tests.dicom_factory import chest_phantom, write_ct_series
from tests.integration.conftest import CT_RULE, ct_node_config, seg_label_map
from tests.node_process import NODE_AE_TITLE, NodeProcess, node_config
from tests.peers import Orthanc, StoreSCP, dciodvfy_errors, free_port, run_storescu, wait_for
from workers.series import load_series

pytestmark = pytest.mark.integration

FINISHED = {JobStateValues.DELIVERED, JobStateValues.FAILED}
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SPACING = (5.0, 3.0, 3.0)


def _write_series(
    folder: Path, slices: int, spacing: tuple[float, float, float] = SPACING, **kwargs: Any
) -> list[Path]:
    phantom = chest_phantom((slices, 64, 64), spacing)
    return write_ct_series(phantom.hu, folder, spacing_mm=phantom.spacing_mm, **kwargs)


def _send(node: NodeProcess, files: list[Path] | Path, calling_ae: str = "SCANNER") -> None:
    sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, calling_ae, files)
    assert sent.returncode == 0, sent.stdout + sent.stderr


def _uid(path: Path, keyword: str) -> str:
    return str(dcmread(path, stop_before_pixels=True).get(keyword))


def _referenced(seg: Dataset) -> set[str]:
    return {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }


def _predecessors(sr: Dataset) -> set[str]:
    return {
        str(instance.ReferencedSOPInstanceUID)
        for study in sr.get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }


def _by_kind(files: list[Path]) -> dict[tuple[str, int], Dataset]:
    """Received objects keyed by (Modality, revision), the revision read from the
    series description ("... (rev 2) - ...")."""
    found: dict[tuple[str, int], Dataset] = {}
    for path in files:
        ds = dcmread(path)
        description = str(ds.get("SeriesDescription", ""))
        revision = int(description.split("(rev ")[1].split(")")[0]) if "(rev " in description else 1
        key = (str(ds.Modality), revision)
        assert key not in found, f"two {key} objects received"
        found[key] = ds
    return found


def _started(node: NodeProcess) -> Iterator[int]:
    yield from (job.id for job in node.jobs() if job.state != JobStateValues.PENDING)


def test_late_instances_and_resends(
    tmp_path: Path, node: NodeProcess, destination: StoreSCP
) -> None:
    files = _write_series(tmp_path / "ct", 40, patient_id="LATE")
    first_part, rest = files[:30], files[30:]
    _send(node, first_part)
    # As soon as the first job is handed to a worker, the rest arrives: it is not in that
    # job's input (its manifest) and makes a second version.
    wait_for(lambda: next(_started(node), None), 60, "the first job to be dispatched")
    _send(node, rest)
    jobs = node.wait_for_jobs(2, FINISHED)
    assert [(j.state, j.revision, j.reason) for j in jobs] == [
        (JobStateValues.DELIVERED, 1, None),
        (JobStateValues.DELIVERED, 2, None),
    ]
    first, second = jobs
    assert first.manifest is not None
    assert second.manifest is not None
    assert len(first.manifest.instances) == 30
    assert len(second.manifest.instances) == 40
    assert (second.predecessor_id, first.superseded_by) == (first.id, second.id)

    received = _by_kind(destination.wait_for_files(4))
    assert set(received) == {("SEG", 1), ("SR", 1), ("SEG", 2), ("SR", 2)}
    seg1, sr1, seg2, sr2 = (received[k] for k in [("SEG", 1), ("SR", 1), ("SEG", 2), ("SR", 2)])
    sop = {_uid(p, "SOPInstanceUID"): p for p in files}
    assert _referenced(seg1) == {_uid(p, "SOPInstanceUID") for p in first_part}
    assert _referenced(seg2) == set(sop)
    # Different content never leaves under an earlier UID.
    assert (
        len({seg1.SOPInstanceUID, sr1.SOPInstanceUID, seg2.SOPInstanceUID, sr2.SOPInstanceUID}) == 4
    )
    assert seg1.SeriesInstanceUID != seg2.SeriesInstanceUID
    assert sr1.SeriesInstanceUID != sr2.SeriesInstanceUID
    assert _predecessors(sr2) == {str(sr1.SOPInstanceUID)}
    assert "PredecessorDocumentsSequence" not in sr1
    assert sr2.SeriesDescription == "ct-tissue SR (rev 2) - NOT FOR CLINICAL USE"
    assert seg2.SeriesDescription == "ct-tissue SEG (rev 2) - NOT FOR CLINICAL USE"
    for path in destination.received():
        assert dciodvfy_errors(path) == [], path

    # The second version covers all 40 slices, voxel for voxel.
    source = load_series(files)
    model = CtTissueModel()
    seg2_path = next(
        p for p in destination.received() if _uid(p, "SOPInstanceUID") == seg2.SOPInstanceUID
    )
    expected = model.predict(source.volume)
    assert (seg_label_map(seg2_path, list(source.datasets), model) == expected).all()
    # The first version's files are as they were sent.
    first_seg = dcmread(node.data_dir / "results" / f"job-{first.id}" / "seg-binary.dcm")
    assert first_seg.SOPInstanceUID == seg1.SOPInstanceUID
    assert first_seg.PixelData == seg1.PixelData

    # pacsnode jobs lists each version and what replaced the first.
    listing = subprocess.run(
        [str(Path(sys.executable).parent / "pacsnode"), "jobs", "--config", str(node.config_path)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert listing[1].split()[:4] == [str(first.id), "1", "delivered", "ct-tissue"]
    assert listing[2].strip() == f"replaced by job {second.id} (newer input)"
    assert listing[3].strip().startswith("stages: load ")  # the worker's stage times
    assert listing[4].split()[:4] == [str(second.id), "2", "delivered", "ct-tissue"]

    # The same 30 again, unchanged: nothing new runs and nothing new is sent.
    _send(node, first_part)
    wait_for(
        lambda: node.log().count("unchanged; nothing to do") >= 30 or None,
        30,
        "the node to log 30 unchanged re-sends",
    )
    wait_for(lambda: _no_series_receiving(node), 30, "no series receiving")
    assert len(node.jobs()) == 2
    assert len(destination.received()) == 4

    # One of them with other pixel data: a third version, on the new bytes.
    changed = tmp_path / "changed.dcm"
    ds = dcmread(first_part[12])
    pixels = ds.pixel_array.copy()
    pixels[20:40, 20:40] = 1500  # bone in the middle of the body
    ds.PixelData = pixels.tobytes()
    ds.save_as(changed)
    _send(node, [changed])
    jobs = node.wait_for_jobs(3, FINISHED)
    third = jobs[2]
    assert (third.state, third.revision, third.predecessor_id) == (
        JobStateValues.DELIVERED,
        3,
        second.id,
    )
    assert third.manifest is not None
    (entry,) = (i for i in third.manifest.instances if i.sop_instance_uid == ds.SOPInstanceUID)
    assert dcmread(entry.path).PixelData == ds.PixelData  # the new bytes, as stored
    assert entry.sha256 == hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
    assert len(destination.wait_for_files(6)) == 6


def _no_series_receiving(node: NodeProcess) -> bool | None:
    with sqlite3.connect(node.data_dir / "state.db") as conn:
        states = [row[0] for row in conn.execute("SELECT state FROM series")]
    return True if states and SeriesStateValues.RECEIVING not in states else None


def _thick_and_thin(tmp_path: Path, **identity: Any) -> tuple[str, list[Path], list[Path]]:
    """One study with a 5 mm series (number 2, in ``thick/``) and a 2.5 mm one (number 3,
    in ``thin/``) on one frame of reference; returns the study UID and both file lists."""
    study, frame = generate_uid(), generate_uid()
    common = {"study_instance_uid": study, "frame_of_reference_uid": frame, **identity}
    thick = _write_series(tmp_path / "thick", 12, (5.0, 3.0, 3.0), series_number=2, **common)
    thin = _write_series(tmp_path / "thin", 24, (2.5, 3.0, 3.0), series_number=3, **common)
    return study, thick, thin


def test_late_better_series_runs_as_new_version(
    tmp_path: Path, node: NodeProcess, destination: StoreSCP
) -> None:
    _, thick, thin = _thick_and_thin(tmp_path, patient_id="LATESERIES")
    _send(node, tmp_path / "thick")
    (first,) = node.wait_for_jobs(1, FINISHED)
    assert first.series_instance_uid == _uid(thick[0], "SeriesInstanceUID")
    _send(node, tmp_path / "thin")
    jobs = node.wait_for_jobs(2, FINISHED)
    second = jobs[1]
    assert len(jobs) == 2  # the thick series gets no skip record: it ran as version 1
    assert (second.state, second.revision, second.predecessor_id) == (
        JobStateValues.DELIVERED,
        2,
        first.id,
    )
    assert second.series_instance_uid == _uid(thin[0], "SeriesInstanceUID")
    received = _by_kind(destination.wait_for_files(4))
    assert _referenced(received[("SEG", 2)]) == {_uid(p, "SOPInstanceUID") for p in thin}
    assert _predecessors(received[("SR", 2)]) == {str(received[("SR", 1)].SOPInstanceUID)}


def test_orthanc_sends_a_study_in_two_parts_and_gets_both_versions(
    tmp_path: Path,
) -> None:
    study, _, thin = _thick_and_thin(tmp_path, patient_id="TWOPART")
    node_port = free_port()
    with (
        Orthanc(
            aet="ORTHANC",
            modalities={"pacsnode": (NODE_AE_TITLE, "127.0.0.1", node_port)},
            workdir=tmp_path / "orthanc",
        ) as orthanc,
        StoreSCP(ae_title="ARCHIVE") as archive,
    ):
        config = node_config(
            tmp_path / "data",
            port=node_port,
            peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1"}],
            destinations={
                "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
                "archive": {
                    "ae_title": "ARCHIVE",
                    "host": "127.0.0.1",
                    "port": archive.port,
                    "supersede": "rejection_note",
                },
            },
            rules=[{**CT_RULE, "send_to": ["pacs", "archive"]}],
        )
        for path in [*sorted((tmp_path / "thick").glob("*.dcm")), *thin]:
            orthanc.upload(path)
        ids = {s["MainDicomTags"]["SeriesNumber"]: s["ID"] for s in orthanc.series()}
        with NodeProcess(tmp_path / "node", config) as node:
            orthanc.send_to_modality("pacsnode", [ids["2"]])
            node.wait_for_jobs(1, FINISHED)
            orthanc.send_to_modality("pacsnode", [ids["3"]])
            jobs = node.wait_for_jobs(2, FINISHED)
            assert [(j.state, j.revision) for j in jobs] == [
                (JobStateValues.DELIVERED, 1),
                (JobStateValues.DELIVERED, 2),
            ]
        segs = wait_for(
            lambda: len(orthanc.find_instances_by_sop_class(SEG_SOP_CLASS)) == 2 or None,
            10,
            "both SEG versions in Orthanc",
        )
        assert segs
        srs = orthanc.find_instances_by_sop_class(COMPREHENSIVE_3D_SR)
        assert len(srs) == 2
        in_orthanc = {
            str(dcmread(DicomBytesIO(orthanc.get_file(i["ID"]))).SOPInstanceUID) for i in srs
        }
        received = _by_kind(archive.wait_for_files(5))
        assert set(received) == {("SEG", 1), ("SR", 1), ("SEG", 2), ("SR", 2), ("KO", 2)}
        assert in_orthanc == {str(received[("SR", r)].SOPInstanceUID) for r in (1, 2)}
        note = received[("KO", 2)]
        title = note.ConceptNameCodeSequence[0]
        assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
        listed = {
            str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for item in note.ContentSequence
            if "ReferencedSOPSequence" in item
        }
        assert listed == {
            str(received[("SEG", 1)].SOPInstanceUID),
            str(received[("SR", 1)].SOPInstanceUID),
        }
        assert note.StudyInstanceUID == study
        note_path = next(p for p in archive.received() if _uid(p, "Modality") == "KO")
        assert dciodvfy_errors(note_path) == []


def _abort_after(node: NodeProcess, files: list[Path]) -> None:
    """Send ``files`` over one association and abort it instead of releasing it."""
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE_TITLE)
    assert assoc.is_established
    for path in files:
        status = assoc.send_c_store(dcmread(path))
        assert status.Status == 0
    assoc.abort()


def test_complete_on_release_and_never_on_abort(tmp_path: Path, destination: StoreSCP) -> None:
    aborted = _write_series(tmp_path / "aborted", 20, patient_id="ABORTED")
    whole = _write_series(tmp_path / "whole", 20, patient_id="WHOLE")
    config = ct_node_config(
        tmp_path / "data",
        destination,
        peers=[{"ae_title": "SCANNER", "host": "127.0.0.1", "complete_on_release": True}],
        quiet_seconds=60.0,
    )
    with NodeProcess(tmp_path / "node", config) as node:
        _abort_after(node, aborted[:10])
        _send(node, tmp_path / "whole")
        # Long before the 60 s quiet period: the release said the series is whole.
        (job,) = node.wait_for_jobs(1, FINISHED, timeout=40)
        assert job.state == JobStateValues.DELIVERED
        assert job.series_instance_uid == _uid(whole[0], "SeriesInstanceUID")
        db = StateDB(node.data_dir / "state.db")
        try:
            series = db.series(_uid(aborted[0], "SeriesInstanceUID"))
        finally:
            db.close()
        assert series is not None
        assert series.state == SeriesStateValues.RECEIVING
        assert "ended without a release" in node.log()
        assert len(destination.wait_for_files(2)) == 2


def test_a_missing_slice_fails_then_the_late_slice_processes(
    tmp_path: Path, node: NodeProcess, destination: StoreSCP
) -> None:
    files = _write_series(tmp_path / "ct", 24, patient_id="GAP")
    hole = files[10]
    _send(node, [p for p in files if p != hole])
    (failed,) = node.wait_for_jobs(1, FINISHED)
    position = [float(v) for v in dcmread(hole, stop_before_pixels=True).ImagePositionPatient]
    assert failed.state == JobStateValues.FAILED
    assert failed.reason == (
        f"1 slice(s) missing from series {_uid(hole, 'SeriesInstanceUID')}: none at "
        f"ImagePositionPatient ({position[0]:.2f}, {position[1]:.2f}, {position[2]:.2f}) mm"
    )
    assert "waiting one more quiet period" in node.log()
    assert destination.received() == []

    _send(node, [hole])
    jobs = node.wait_for_jobs(2, FINISHED)
    assert jobs[1].state == JobStateValues.DELIVERED
    received = _by_kind(destination.wait_for_files(2))
    assert _referenced(received[("SEG", 1)]) == {_uid(p, "SOPInstanceUID") for p in files}
    source = load_series(files)
    model = CtTissueModel()
    seg_path = next(p for p in destination.received() if _uid(p, "Modality") == "SEG")
    actual = seg_label_map(seg_path, list(source.datasets), model)
    assert (actual == model.predict(source.volume)).all()

"""Faults: crashes, a destination that is down, unknown peers and broken input.

Each test checks that nothing acknowledged is lost and that the node keeps serving.
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from node.state import JobStateValues, SeriesRecord, SeriesStateValues, StateDB
from tests.dicom_factory import write_broken_file
from tests.integration.conftest import ct_node_config, make_phantom_series
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import (
    STORESCU,
    StoreSCP,
    acknowledged_files,
    dcmtk_env,
    run_storescu,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.serial]

FINISHED = {JobStateValues.DELIVERED, JobStateValues.FAILED}


def _send(node: NodeProcess, folder: Path | list[Path], calling_ae: str = "SCANNER") -> None:
    sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, calling_ae, folder)
    assert sent.returncode == 0, sent.stdout + sent.stderr


def _recorded_sop_uids(node: NodeProcess) -> set[str]:
    with sqlite3.connect(node.data_dir / "state.db") as conn:
        return {row[0] for row in conn.execute("SELECT sop_instance_uid FROM instances")}


def _referenced_by_seg(files: list[Path]) -> set[str]:
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        if ds.Modality == "SEG":
            return {
                item.ReferencedSOPInstanceUID
                for series in ds.ReferencedSeriesSequence
                for item in series.ReferencedInstanceSequence
            }
    raise AssertionError("no SEG received")


def test_unknown_calling_ae_is_rejected_and_node_keeps_serving(
    node: NodeProcess, phantom_dir: Path
) -> None:
    refused = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "INTRUDER", phantom_dir)
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stdout + refused.stderr
    assert _recorded_sop_uids(node) == set()

    echo = subprocess.run(
        ["/usr/bin/echoscu", "-aet", "SCANNER", "-aec", NODE_AE_TITLE, "127.0.0.1", str(node.port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert echo.returncode == 0, echo.stdout + echo.stderr


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("short_pixel_data", "truncated"), ("no_pixel_data", "PixelData")],
)
def test_broken_instance_fails_its_job_only(
    kind: str,
    reason: str,
    tmp_path: Path,
    node: NodeProcess,
    destination: StoreSCP,
) -> None:
    broken = make_phantom_series(tmp_path / "broken", "BROKEN")
    victim = sorted(broken.glob("*.dcm"))[5]
    write_broken_file(victim, victim, kind=kind)  # type: ignore[arg-type]
    _send(node, broken)
    good = make_phantom_series(tmp_path / "good", "GOOD")
    _send(node, good)

    jobs = node.wait_for_jobs(2, FINISHED)
    by_series = {job.series_instance_uid: job for job in jobs}
    broken_uid = dcmread(min(broken.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
    good_uid = dcmread(min(good.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
    assert by_series[good_uid].state == JobStateValues.DELIVERED
    failed = by_series[broken_uid]
    assert failed.state == JobStateValues.FAILED
    assert failed.reason is not None
    assert reason in failed.reason
    assert len(destination.wait_for_files(2)) == 2


def test_destination_down_then_up_gets_the_results(
    node: NodeProcess, destination: StoreSCP, phantom_dir: Path
) -> None:
    destination.stop()
    _send(node, phantom_dir)

    def delivery_retried() -> bool:
        jobs = node.jobs()
        return bool(jobs) and jobs[0].state == JobStateValues.RESULTS_READY and _retries(node) > 0

    wait_for(delivery_retried, 60, "a failed delivery attempt while the destination is down")
    destination.start()
    jobs = node.wait_for_jobs(1, FINISHED, timeout=60)
    assert jobs[0].state == JobStateValues.DELIVERED
    assert len(destination.wait_for_files(2)) == 2


def _retries(node: NodeProcess) -> int:
    with sqlite3.connect(node.data_dir / "state.db") as conn:
        row = conn.execute("SELECT COALESCE(SUM(attempts), 0) FROM deliveries").fetchone()
    return int(row[0])


def test_sigkill_mid_ingest_loses_no_acknowledged_instance(
    tmp_path: Path, node: NodeProcess, destination: StoreSCP, cranium_dir: Path
) -> None:
    log = tmp_path / "storescu.log"
    with log.open("w") as out:
        sender = subprocess.Popen(
            [STORESCU, "-v", "-aet", "SCANNER", "-aec", NODE_AE_TITLE,
             "127.0.0.1", str(node.port), "+sd", str(cranium_dir)],
            env=dcmtk_env(), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        spool = node.data_dir / "spool"
        wait_for(lambda: len(list(spool.glob("*/*/*.dcm"))) >= 10, 60, "10 spooled instances")
        node.kill()
        assert sender.wait(60) != 0, "storescu finished before the kill; nothing was tested"

    acknowledged = acknowledged_files(log.read_text())
    assert 10 <= len(acknowledged) < len(list(cranium_dir.glob("*.dcm")))
    node.start()
    recorded = _recorded_sop_uids(node)
    for path in acknowledged:
        assert dcmread(path, stop_before_pixels=True).SOPInstanceUID in recorded, path

    _send(node, cranium_dir)  # the scanner sends the study again
    jobs = node.wait_for_jobs(1, FINISHED)
    assert jobs[0].state == JobStateValues.DELIVERED, jobs[0].reason
    all_uids = {
        dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in cranium_dir.glob("*.dcm")
    }
    assert _referenced_by_seg(destination.wait_for_files(2)) == all_uids


@pytest.mark.parametrize("victim", ["node", "worker"])
def test_sigkill_mid_job_completes_after_restart(
    victim: str, node: NodeProcess, destination: StoreSCP, cranium_dir: Path
) -> None:
    _send(node, cranium_dir)
    wait_for(
        lambda: any(
            j.state in {JobStateValues.QUEUED, JobStateValues.RUNNING} for j in node.jobs()
        ),
        60,
        "the job to be dispatched",
    )
    if victim == "node":
        node.kill()
        node.start()
    else:
        node.kill_worker()
    jobs = node.wait_for_jobs(1, FINISHED)
    assert jobs[0].state == JobStateValues.DELIVERED, jobs[0].reason
    all_uids = {
        dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in cranium_dir.glob("*.dcm")
    }
    assert _referenced_by_seg(destination.wait_for_files(2)) == all_uids


def test_sigkill_between_a_late_instance_and_its_rerun(
    tmp_path: Path, destination: StoreSCP
) -> None:
    """The late instance is recorded (series receiving again) before Success; a node
    killed before the quiet period ends reruns the study after restart, once."""
    series = sorted(make_phantom_series(tmp_path / "ct", "RERUN").glob("*.dcm"))
    config = ct_node_config(tmp_path / "data", destination, quiet_seconds=5.0)
    with NodeProcess(tmp_path / "node", config) as node:
        _send(node, series[:-1])
        (first,) = node.wait_for_jobs(1, FINISHED)
        assert first.state == JobStateValues.DELIVERED
        _send(node, series[-1:])
        node.kill()  # well inside the 5 s quiet period
        db = StateDB(node.data_dir / "state.db")
        try:
            record = db.series(first.series_instance_uid)
            assert record is not None
            assert (record.state, record.reopened) == (SeriesStateValues.RECEIVING, 1)
            assert len(db.jobs()) == 1
        finally:
            db.close()
        node.start()
        jobs = node.wait_for_jobs(2, FINISHED)
        assert [(j.state, j.revision) for j in jobs] == [
            (JobStateValues.DELIVERED, 1),
            (JobStateValues.DELIVERED, 2),
        ]
        assert jobs[1].manifest is not None
        assert len(jobs[1].manifest.instances) == len(series)
        wait_for(
            lambda: not any(
                s.state == SeriesStateValues.RECEIVING for s in _series_records(node)
            ) or None,
            30,
            "the study routed",
        )  # fmt: skip
        assert len(node.jobs()) == 2
    assert len(destination.wait_for_files(4)) == 4


def _series_records(node: NodeProcess) -> list[SeriesRecord]:
    db = StateDB(node.data_dir / "state.db")
    try:
        return [s for state in SeriesStateValues for s in db.series_in_state(state)]
    finally:
        db.close()

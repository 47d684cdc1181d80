"""The disk guard on a real small file system: a tmpfs as the node's data folder.

storescu sends more than fits above the guard: every instance answered Success is on
disk and recorded, the others got Out of Resources (0xA700) before anything was written,
C-ECHO still works, one warning per association names the free space, /readyz names the
disk and the dashboard shows a banner. After space is freed the same storescu run
succeeds and the study is processed and delivered.
Mounting a tmpfs needs root; elsewhere the test is skipped and says why.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from pydicom import dcmread

from node.state import JobStateValues
from tests.dicom_factory import write_ct_series
from tests.integration.conftest import CT_RULE, ct_node_config
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import StoreSCP, dcmtk_env, run_storescu

pytestmark = pytest.mark.integration

SLICES = 40
GUARD_BYTES = 24 * 1024**2


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs, unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the disk guard needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _series(folder: Path) -> list[Path]:
    """A CT of 40 slices of 256x256 (128 KiB each): about 5 MiB."""
    hu = np.random.default_rng(5).integers(-1000, 1500, (SLICES, 256, 256)).astype(np.int16)
    return write_ct_series(hu, folder, spacing_mm=(2.0, 1.0, 1.0))


def _answers(output: str) -> list[str]:
    """storescu -v: the status of each C-STORE, in sending order."""
    return re.findall(r"Received Store Response \(([^)]*)\)", output)


def _recorded(node: NodeProcess) -> set[str]:
    with sqlite3.connect(node.data_dir / "state.db") as conn:
        return {row[0] for row in conn.execute("SELECT sop_instance_uid FROM instances")}


def test_a_full_disk_refuses_new_instances_and_loses_nothing(
    small_disk: Path, tmp_path: Path
) -> None:
    files = _series(tmp_path / "ct")
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    rule = dict(CT_RULE, match={**CT_RULE["match"], "min_instances": SLICES})
    with StoreSCP(ae_title="DESTPACS") as destination:
        config = ct_node_config(
            small_disk / "data", destination, storage={"min_free_bytes": GUARD_BYTES}
        )
        config["rules"] = [rule]
        with NodeProcess(tmp_path / "node", config) as node:
            # Leave room above the guard for about a quarter of the series.
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            filler = small_disk / "filler"
            filler.write_bytes(b"\0" * (free - GUARD_BYTES - SLICES // 4 * 140_000))

            first = run_storescu(
                "127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", files,
                extra_args=["-v", "--no-halt"],  # send every file whatever the answers
            )  # fmt: skip
            answers = _answers(first.stdout + first.stderr)
            assert len(answers) == SLICES, first.stdout + first.stderr
            accepted = {uid for uid, a in zip(uids, answers, strict=True) if a == "Success"}
            refused = [a for a in answers if a != "Success"]
            assert 0 < len(accepted) < SLICES, answers
            assert refused == ["Refused: OutOfResources"] * len(refused)  # 0xA700
            # Exactly the instances answered Success are recorded and on disk.
            assert _recorded(node) == accepted
            spooled = {p.name.split("_")[0] for p in (node.data_dir / "spool").rglob("*.dcm")}
            assert spooled == accepted

            echo = subprocess.run(
                ["/usr/bin/echoscu", "-aet", "SCANNER", "-aec", NODE_AE_TITLE,
                 "127.0.0.1", str(node.port)],
                env=dcmtk_env(), capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert echo.returncode == 0, echo.stdout + echo.stderr
            warnings = re.findall(r"refusing new instances on this association: .*", node.log())
            assert len(warnings) == 1, warnings  # once per association
            assert "free of" in warnings[0]
            assert "below the disk guard" in warnings[0]
            # The console says so: /readyz names the disk, the dashboard has a banner.
            ready = requests.get(f"{node.console_url}/readyz", timeout=30)
            assert ready.status_code == 503
            assert "disk" in ready.json()["failing"], ready.json()
            assert not ready.json()["checks"]["disk"]["ok"]
            dashboard = requests.get(node.console_url, timeout=30).text
            assert 'id="disk-banner"' in dashboard
            assert "New instances are refused" in dashboard

            filler.unlink()  # space is back: the same run goes through, no restart
            ready = requests.get(f"{node.console_url}/readyz", timeout=30)
            assert ready.json()["checks"]["disk"]["ok"]
            assert 'id="disk-banner"' not in requests.get(node.console_url, timeout=30).text
            again = run_storescu(
                "127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", files, extra_args=["-v"]
            )
            assert _answers(again.stdout + again.stderr) == ["Success"] * SLICES
            assert _recorded(node) == set(uids)
            (job,) = node.wait_for_jobs(1, {JobStateValues.DELIVERED, JobStateValues.FAILED})
            assert job.state == JobStateValues.DELIVERED, job.reason
            assert len(destination.wait_for_files(2)) >= 2  # SEG and SR

"""Load on the SCP: eight storescu associations of 300 images at once, and the
association limit (``node.max_associations``) holding under it."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association

from node.state import JobStateValues
from tests.dicom_factory import write_ct_series
from tests.integration.conftest import CT_RULE, ct_node_config
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import StoreSCP, build_storescu_command, dcmtk_env, wait_for
from tests.standin import STANDIN_MODEL, install_standin

pytestmark = pytest.mark.integration

SENDERS = 8
IMAGES = 300
VERIFICATION = "1.2.840.10008.1.1"


def test_eight_concurrent_senders_each_image_once_one_job_per_series(
    tmp_path: Path, destination: StoreSCP
) -> None:
    rng = np.random.default_rng(8)
    series = []
    for n in range(SENDERS):
        folder = tmp_path / f"series-{n}"
        hu = rng.integers(-1000, 1000, size=(IMAGES, 32, 32), dtype=np.int16)
        write_ct_series(hu, folder, spacing_mm=(1.0, 1.0, 1.0), patient_id=f"LOAD{n}")
        series.append(folder)
    install_standin(tmp_path / "models", 0.0)
    config = ct_node_config(
        tmp_path / "data", destination, models_dir=str(tmp_path / "models"), quiet_seconds=60.0
    )
    # Each sender's series completes when it releases its association: a pause of the
    # loaded node between two images must not cut a series in two.
    config["peers"] = [{"ae_title": "SCANNER", "host": "127.0.0.1", "complete_on_release": True}]
    config["rules"] = [dict(CT_RULE, name="standin", models=[STANDIN_MODEL])]
    with NodeProcess(tmp_path / "node", config) as node, tempfile.TemporaryDirectory() as scratch:
        senders = [
            subprocess.Popen(
                build_storescu_command(
                    "127.0.0.1",
                    node.port,
                    NODE_AE_TITLE,
                    "SCANNER",
                    folder,
                    config_dir=Path(scratch),
                    extra_args=["-v"],
                ),
                env=dcmtk_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for folder in series
        ]
        outputs = [sender.communicate(timeout=300)[0] for sender in senders]
        for sender, output in zip(senders, outputs, strict=True):
            assert sender.returncode == 0, output[-2000:]
            assert output.count("Received Store Response (Success)") == IMAGES
        jobs = node.wait_for_jobs(SENDERS, {JobStateValues.DELIVERED, JobStateValues.FAILED}, 300)
        assert len(jobs) == SENDERS  # one job per series
        assert all(j.state == JobStateValues.DELIVERED for j in jobs), [j.reason for j in jobs]
        spooled = sorted(p.name.split("_")[0] for p in (node.data_dir / "spool").rglob("*.dcm"))
        sent = sorted(
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for folder in series for p in folder.glob("*.dcm")
        )  # fmt: skip
        assert spooled == sent  # each image exactly once
        assert not list((node.data_dir / "spool" / ".incoming").iterdir())
        assert {len(j.manifest.instances) for j in jobs if j.manifest} == {IMAGES}
        errors = [line for line in node.log().splitlines() if " ERROR " in line]
        assert errors == []


def test_one_association_beyond_max_associations_is_rejected(
    tmp_path: Path, destination: StoreSCP
) -> None:
    config = ct_node_config(tmp_path / "data", destination)
    # The start-up port check holds a slot until the ACSE timeout ends it.
    config["node"].update(max_associations=4, acse_timeout_seconds=3)
    with NodeProcess(tmp_path / "node", config) as node:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(VERIFICATION)

        def associate() -> Association:
            return ae.associate("127.0.0.1", node.port, ae_title=NODE_AE_TITLE)

        def established() -> Association | None:
            assoc = associate()
            return assoc if assoc.is_established else None

        held: list[Association] = []
        try:
            for _ in range(4):
                held.append(wait_for(established, 20, "a free slot"))
            fifth = associate()
            assert fifth.is_rejected
            answer = fifth.acceptor.primitive
            assert answer is not None
            assert answer.result == 0x02  # transient: try again later
            for assoc in held:  # the four complete their work
                assert assoc.send_c_echo().Status == 0
        finally:
            for assoc in held:
                assoc.release()
        again = associate()
        assert again.is_established
        again.release()

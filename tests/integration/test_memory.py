"""One 3,000-instance series ingested: the node's memory stays bounded and flat."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.dicom_factory import write_ct_series
from tests.node_process import NODE_AE_TITLE, NodeProcess, node_config, rss_kib
from tests.peers import build_storescu_command, dcmtk_env

pytestmark = pytest.mark.integration

INSTANCES = 3000
LIMIT_KIB = 300 * 1024


def test_a_3000_instance_series_keeps_the_node_under_300_mb(tmp_path: Path) -> None:
    hu = np.random.default_rng(3).integers(-1000, 1000, size=(INSTANCES, 32, 32), dtype=np.int16)
    folder = tmp_path / "ct"
    write_ct_series(hu, folder, spacing_mm=(1.0, 1.0, 1.0))
    config = node_config(tmp_path / "data", port=0, quiet_seconds=30.0)
    del config["node"]["port"]
    with NodeProcess(tmp_path / "node", config) as node:
        assert node.process is not None
        pid = node.process.pid
        samples: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(1.0):
                samples.append(rss_kib(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        command = build_storescu_command(
            "127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", folder, config_dir=tmp_path
        )
        sent = subprocess.run(command, env=dcmtk_env(), capture_output=True, text=True,
                              timeout=600, check=False)  # fmt: skip
        time.sleep(1.5)
        done.set()
        sampler.join()
        assert sent.returncode == 0, sent.stderr[-2000:]
        spooled = len(list((node.data_dir / "spool").glob("*/*/*.dcm")))
        assert spooled == INSTANCES
        assert len(samples) >= 3, samples
        assert max(samples) < LIMIT_KIB, samples
        # Flat: the last samples are no higher than the first ones by more than 20 MB.
        third = max(1, len(samples) // 3)
        assert max(samples[-third:]) - max(samples[:third]) < 20 * 1024, samples

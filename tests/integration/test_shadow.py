"""Shadow mode: a rule runs its model and keeps the results, sending nothing; switching
it to live with a SIGHUP takes effect for the next study without restarting anything."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from node.state import JobStateValues
from tests.integration.conftest import CT_RULE, ct_node_config, make_phantom_series
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import StoreSCP, run_storescu, wait_for

pytestmark = pytest.mark.integration


def _worker_pid(node: NodeProcess) -> int:
    assert node.process is not None
    children = Path(f"/proc/{node.process.pid}/task/{node.process.pid}/children").read_text()
    for pid in children.split():
        if "worker" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return int(pid)
    raise AssertionError("no embedded worker")


def test_shadow_rule_keeps_results_and_goes_live_on_sighup(
    tmp_path: Path, destination: StoreSCP
) -> None:
    config = ct_node_config(tmp_path / "data", destination)
    config["rules"] = [{**CT_RULE, "mode": "shadow"}]
    with NodeProcess(tmp_path / "node", config) as node:
        first = make_phantom_series(tmp_path / "first", "SHADOW1")
        sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", first)
        assert sent.returncode == 0, sent.stderr
        (kept,) = node.wait_for_jobs(1, {JobStateValues.KEPT, JobStateValues.FAILED})
        assert (kept.state, kept.shadow, kept.destinations) == (JobStateValues.KEPT, True, ())
        results = node.data_dir / "results" / f"job-{kept.id}"
        seg = dcmread(results / "seg-binary.dcm")
        assert seg.StudyInstanceUID == dcmread(next(first.glob("*.dcm"))).StudyInstanceUID
        assert (results / "sr.dcm").is_file()
        assert destination.received() == []

        worker = _worker_pid(node)
        config["rules"] = [{**CT_RULE, "mode": "live"}]
        node.config_path.write_text(yaml.safe_dump(config))
        assert node.process is not None
        os.kill(node.process.pid, signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in node.log() or None, 30, "the reload")

        second = make_phantom_series(tmp_path / "second", "LIVE2")
        sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", second)
        assert sent.returncode == 0, sent.stderr
        jobs = node.wait_for_jobs(2, {JobStateValues.KEPT, JobStateValues.DELIVERED})
        assert [(j.state, j.shadow) for j in jobs] == [
            (JobStateValues.KEPT, True),
            (JobStateValues.DELIVERED, False),
        ]
        received = destination.wait_for_files(2)
        studies = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in received}
        assert studies == {str(dcmread(next(second.glob("*.dcm"))).StudyInstanceUID)}
        assert _worker_pid(node) == worker  # nothing was restarted

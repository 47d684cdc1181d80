"""The overlapping worker (``worker.overlap``): jobs share one worker's stages, each stage
one job at a time, and every job writes exactly what the serial worker writes.

The model is the stand-in (:mod:`tests.standin`), which holds the model stage for a set
time like a network on a GPU.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from models.registry import reload_models, use_models_dir
from node.state import Job, JobStateValues
from tests.integration.conftest import CT_RULE, ct_node_config, make_phantom_series
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import StoreSCP, run_storescu, wait_for
from tests.standin import STANDIN_MODEL, install_standin
from workers.pipeline import run_job

pytestmark = pytest.mark.integration

STUDIES = 4
FINISHED = {JobStateValues.DELIVERED, JobStateValues.FAILED}


def _standin_node(workdir: Path, destination: StoreSCP, seconds: float) -> NodeProcess:
    models_dir = workdir / "models"
    install_standin(models_dir, seconds)
    rule = dict(CT_RULE, name="standin", models=[STANDIN_MODEL])
    config = ct_node_config(workdir / "data", destination, models_dir=str(models_dir))
    config["rules"] = [rule]
    return NodeProcess(workdir, config)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four chest phantoms, each its own study."""
    root = tmp_path_factory.mktemp("studies")
    return [make_phantom_series(root / f"s{n}", f"BUSY{n}") for n in range(STUDIES)]


@pytest.fixture
def standin_registered(tmp_path: Path) -> Iterator[None]:
    """The stand-in in this process's registry too (for the serial re-run)."""
    install_standin(tmp_path / "models", 0.0)
    use_models_dir(tmp_path / "models")
    yield
    use_models_dir(None)
    reload_models()


def _send_all(node: NodeProcess, studies: list[Path]) -> None:
    for folder in studies:
        sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", folder)
        assert sent.returncode == 0, sent.stdout + sent.stderr


def _intervals(jobs: list[Job], start: str, end: str) -> list[tuple[float, float]]:
    spans = []
    for job in jobs:
        assert job.result is not None
        stages = job.result.stages_at
        spans.append((stages[start], stages[end]))
    return sorted(spans)


def test_jobs_overlap_and_write_what_the_serial_worker_writes(
    tmp_path: Path, destination: StoreSCP, studies: list[Path], standin_registered: None
) -> None:
    with _standin_node(tmp_path / "node", destination, seconds=1.0) as node:
        _send_all(node, studies)
        jobs = node.wait_for_jobs(STUDIES, FINISHED, timeout=240)
    assert all(job.state == JobStateValues.DELIVERED for job in jobs), [j.reason for j in jobs]

    # The model stage is held by one job at a time...
    models = _intervals(jobs, "model", "write")
    for (_, end), (start, _) in itertools.pairwise(models):
        assert start >= end - 0.01
    # ...while other jobs load or write beside it.
    lifetimes = _intervals(jobs, "load", "done")
    assert any(later_start < end for (_, end), (later_start, _) in itertools.pairwise(lifetimes)), (
        f"no two jobs overlapped: {lifetimes}"
    )

    # Each job's files, byte for byte, as the serial pipeline writes them from its request.
    for job in jobs:
        assert job.request is not None
        assert job.result is not None
        serial_dir = tmp_path / "serial" / str(job.id)
        request = job.request.model_copy(update={"output_dir": str(serial_dir)})
        serial = run_job(request)
        assert serial.status == "ok", serial.reason
        assert sorted(f.name for f in serial.files) == sorted(f.name for f in job.result.files)
        for written in job.result.files:
            assert Path(written.path).read_bytes() == (serial_dir / written.name).read_bytes(), (
                f"job {job.id}: {written.name} differs from the serial worker's"
            )


@pytest.mark.serial
def test_sigkill_mid_overlap_delivers_every_job_once(tmp_path: Path, studies: list[Path]) -> None:
    with (
        StoreSCP(ae_title="DESTPACS", extra_args=["+uf"]) as destination,  # a file per C-STORE
        _standin_node(tmp_path / "node", destination, seconds=2.0) as node,
    ):
        _send_all(node, studies)
        running = {JobStateValues.RUNNING}
        wait_for(
            lambda: sum(job.state in running for job in node.jobs()) >= 2 or None,
            120,
            "two jobs running at once on the worker",
        )
        node.kill_worker()
        jobs = node.wait_for_jobs(STUDIES, FINISHED, timeout=300)
        assert all(job.state == JobStateValues.DELIVERED for job in jobs), [j.reason for j in jobs]
        expected = sum(len(job.result.files) for job in jobs if job.result is not None)
        received = destination.wait_for_files(expected)
        counts = Counter(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received)
        log = node.log()
    assert len(counts) == expected
    assert all(n == 1 for n in counts.values()), {uid: n for uid, n in counts.items() if n > 1}
    assert "worker exited with code -9; restarting it" in log

"""Decoding a series during its quiet period (``worker.preload``), through ``pacsnode
run``: the node hints the worker once the series falls silent, the worker loads it, and
the job takes it instead of reading the files, with the serial and the overlapping
worker; its results are the bytes the pipeline writes when it reads the files itself.
A series sent in two bursts is preloaded again once it doubled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.registry import reload_models, use_models_dir
from node.state import Job, JobStateValues
from tests.integration.conftest import CT_RULE, ct_node_config, make_phantom_series
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import StoreSCP, run_storescu
from tests.standin import STANDIN_MODEL, install_standin
from workers.pipeline import run_job

pytestmark = pytest.mark.integration

FINISHED = {JobStateValues.DELIVERED, JobStateValues.FAILED}


@pytest.fixture
def standin_registered(tmp_path: Path) -> Iterator[Path]:
    """The stand-in in a models folder, registered in this process too (to run the
    node's request here)."""
    models_dir = tmp_path / "models"
    install_standin(models_dir, 0.0)
    use_models_dir(models_dir)
    yield models_dir
    use_models_dir(None)
    reload_models()


def _node(workdir: Path, destination: StoreSCP, models_dir: Path, **worker: bool) -> NodeProcess:
    config = ct_node_config(
        workdir / "data", destination, models_dir=str(models_dir), quiet_seconds=2.0
    )
    config["rules"] = [dict(CT_RULE, name="standin", models=[STANDIN_MODEL])]
    config["worker"] = worker
    return NodeProcess(workdir, config)


def _send(node: NodeProcess, files: list[Path]) -> None:
    sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", files)
    assert sent.returncode == 0, sent.stdout + sent.stderr


def _assert_same_as_reading_the_files(job: Job, out: Path) -> None:
    assert job.request is not None
    assert job.result is not None
    again = run_job(job.request.model_copy(update={"output_dir": str(out)}))
    assert again.status == "ok", again.reason
    assert not again.preloaded
    assert [f.name for f in again.files] == [f.name for f in job.result.files]
    for ours, theirs in zip(job.result.files, again.files, strict=True):
        assert Path(ours.path).read_bytes() == Path(theirs.path).read_bytes(), ours.name


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapping", "serial"])
def test_the_job_takes_the_series_decoded_in_its_quiet_period(
    tmp_path: Path, destination: StoreSCP, standin_registered: Path, overlap: bool
) -> None:
    series = make_phantom_series(tmp_path / "ct", "PRELOAD")
    with _node(tmp_path / "node", destination, standin_registered, overlap=overlap) as node:
        _send(node, sorted(series.glob("*.dcm")))
        (job,) = node.wait_for_jobs(1, FINISHED, timeout=120)
        log = node.log()
    assert job.state == JobStateValues.DELIVERED, job.reason
    assert job.result is not None
    assert job.result.preloaded, log
    assert "took the preloaded series" in log
    assert job.result.timings_s["load"] < 1.0
    _assert_same_as_reading_the_files(job, tmp_path / "again")


def test_a_series_in_two_bursts_is_preloaded_again_once_it_doubled(
    tmp_path: Path, destination: StoreSCP, standin_registered: Path
) -> None:
    files = sorted(make_phantom_series(tmp_path / "ct", "BURSTS").glob("*.dcm"))
    half = len(files) // 2
    with _node(tmp_path / "node", destination, standin_registered) as node:
        _send(node, files[:half])
        time.sleep(0.8)  # silent longer than the lull (0.25 s), shorter than the quiet period
        _send(node, files[half:])
        (job,) = node.wait_for_jobs(1, FINISHED, timeout=120)
        log = node.log()
    assert job.state == JobStateValues.DELIVERED, job.reason
    assert f"preloaded series {job.series_instance_uid} ({half} instances)" in log, log
    assert f"preloaded series {job.series_instance_uid} ({len(files)} instances)" in log, log
    assert job.result is not None
    assert job.result.preloaded
    _assert_same_as_reading_the_files(job, tmp_path / "again")

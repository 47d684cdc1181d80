"""Decoding a series during its quiet period (workers.inputs, node.preload_hints).

A job that takes a preloaded series writes the very bytes it writes when it loads the
files itself; a preload of other instances or digests is never used, and is used once;
the folder keeps two series and a starting worker removes dead workers' folders. The
node hints a series once it is silent for the lull, to the queue of the model a rule
gives it, and again only when it has doubled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kombu.exceptions import KombuError

from node.config import Config
from node.preload_hints import PreloadHints, lull_seconds
from node.state import StateDB
from tests.dicom_factory import chest_phantom, write_ct_series
from tests.job_requests import job_request
from tests.node_process import node_config
from workers import inputs
from workers.contract import PRELOAD, ManifestInstance
from workers.pipeline import run_job
from workers.series import load_series


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "preload"
    path.mkdir()
    inputs.use_preload_folder(path)
    yield path
    inputs.use_preload_folder(None)


def _series(folder: Path, slices: int = 12, seed_hu: int = 0) -> list[Path]:
    phantom = chest_phantom((slices, 48, 48), spacing_mm=(2.5, 7.0, 7.0))
    return write_ct_series(phantom.hu + seed_hu, folder, spacing_mm=phantom.spacing_mm)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_preloaded_job_writes_the_same_bytes_and_uses_the_preload_once(
    tmp_path: Path, folder: Path
) -> None:
    _series(tmp_path / "ct")
    request = job_request(tmp_path / "ct", "ct-tissue", tmp_path / "loaded", created_at=1.7e9)
    loaded = run_job(request)
    assert loaded.status == "ok", loaded.reason
    assert not loaded.preloaded

    assert inputs.preload(request.manifest.instances)
    assert len(_entries(folder)) == 1
    assert not inputs.preload(request.manifest.instances)  # there already
    again = request.model_copy(update={"output_dir": str(tmp_path / "preloaded")})
    preloaded = run_job(again)
    assert preloaded.status == "ok", preloaded.reason
    assert preloaded.preloaded
    assert _entries(folder) == []  # taken
    assert [f.name for f in preloaded.files] == [f.name for f in loaded.files]
    for theirs, ours in zip(loaded.files, preloaded.files, strict=True):
        assert Path(ours.path).read_bytes() == Path(theirs.path).read_bytes(), ours.name
    assert preloaded.measurements == loaded.measurements
    # Used once: the same request now loads the files.
    third = run_job(request.model_copy(update={"output_dir": str(tmp_path / "third")}))
    assert third.status == "ok"
    assert not third.preloaded


def test_a_preload_of_other_instances_or_digests_is_not_taken(tmp_path: Path, folder: Path) -> None:
    paths = _series(tmp_path / "ct")
    instances = job_request(tmp_path / "ct", "ct-tissue", tmp_path / "out").manifest.instances
    assert inputs.preload(instances[:-1])  # the last slice had not arrived yet
    assert inputs.take(instances) is None
    changed = [*instances[:-1], instances[-1].model_copy(update={"sha256": "0" * 64})]
    assert inputs.preload(instances)
    assert inputs.take(changed) is None  # a re-sent slice with other bytes
    series = inputs.take(instances)
    assert series is not None
    assert len(_entries(folder)) == 1  # the 11-slice preload stays until evicted
    reference = load_series(paths)
    assert np.array_equal(series.volume.voxels, reference.volume.voxels)
    assert series.volume.voxels.dtype == np.float32
    assert series.volume.voxels.flags.writeable
    assert series.volume.spacing_mm == reference.volume.spacing_mm
    assert [ds.SOPInstanceUID for ds in series.datasets] == [
        ds.SOPInstanceUID for ds in reference.datasets
    ]


def test_a_file_that_does_not_match_its_digest_is_not_preloaded(
    tmp_path: Path, folder: Path
) -> None:
    _series(tmp_path / "ct")
    instances = job_request(tmp_path / "ct", "ct-tissue", tmp_path / "out").manifest.instances
    wrong = [*instances[:-1], instances[-1].model_copy(update={"size": 1})]
    assert not inputs.preload(wrong)
    assert _entries(folder) == []


def test_a_full_folder_drops_hints_and_old_series_go(tmp_path: Path, folder: Path) -> None:
    manifests = []
    for n in range(inputs.CAPACITY + 2):
        _series(tmp_path / f"ct{n}", seed_hu=n)
        request = job_request(tmp_path / f"ct{n}", "ct-tissue", tmp_path / "out")
        manifests.append(request.manifest.instances)
    first, second, third, fourth = manifests
    assert inputs.preload(first)
    assert inputs.preload(second)
    assert not inputs.preload(third)  # full: the first ones stay for the first jobs
    assert inputs.take(first) is not None
    assert inputs.preload(third)
    # A series whose job never came goes after MAX_AGE_SECONDS, and so does what a job
    # process that died while preloading left.
    (entry,) = [p for p in folder.iterdir() if p.name == inputs._key(second)]
    old = time.time() - inputs.MAX_AGE_SECONDS - 1
    os.utime(entry, (old, old))
    dead = folder / f".loading-{_dead_pid()}-{inputs._key(fourth)}"
    dead.mkdir()
    dead_taker = folder / f".taken-{_dead_pid()}-{inputs._key(first)}"
    dead_taker.mkdir()
    assert inputs.preload(fourth)
    assert not dead.exists()
    assert not dead_taker.exists()
    assert inputs.take(second) is None
    assert inputs.take(third) is not None
    assert inputs.take(fourth) is not None


def _dead_pid() -> int:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(gone.stdout)


def test_a_starting_worker_removes_the_folders_of_workers_that_are_gone() -> None:
    first = inputs.create_preload_folder()
    base = first.parent  # /dev/shm, or the temporary folder where that is small
    dead = base / f"pacsnode-preload-{_dead_pid()}-test"
    alive = base / f"pacsnode-preload-{os.getppid()}-test"
    dead.mkdir()
    alive.mkdir()
    made = [first, dead, alive]
    try:
        second = inputs.create_preload_folder()
        made.append(second)
        assert not dead.exists()
        assert alive.exists()  # its worker still runs
        assert first.exists()  # this process's own
        assert second.parent == base
        assert second.stat().st_mode & 0o777 == 0o700
        assert inputs._Folder.path == second
    finally:
        inputs.use_preload_folder(None)
        for path in made:
            if path.exists():
                path.rmdir()


def test_a_series_the_folder_cannot_hold_is_not_preloaded(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _series(tmp_path / "ct")
    instances = job_request(tmp_path / "ct", "ct-tissue", tmp_path / "out").manifest.instances

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert not inputs.preload(instances)
    assert _entries(folder) == []
    assert inputs.take(instances) is None


class _Broker:
    """Records the tasks the node sends."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_task(self, name: str, **options: Any) -> None:
        self.sent.append({"name": name, **options})


def _config(tmp_path: Path, **worker: Any) -> Config:
    rule = {"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "send_to": []}
    return Config.model_validate(
        node_config(tmp_path / "data", port=11112, rules=[rule], quiet_seconds=2.0, worker=worker)
    )


def _record(db: StateDB, instances: list[ManifestInstance], series_uid: str, at: float) -> None:
    for instance in instances:
        db.record_instance(
            sop_instance_uid=instance.sop_instance_uid,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            series_instance_uid=series_uid,
            study_instance_uid="1.2.3",
            calling_ae_title="SCANNER",
            path=Path(instance.path),
            size=instance.size,
            sha256=instance.sha256,
            received_at=at,
        )


def test_the_node_hints_a_silent_series_and_again_only_when_it_doubled(tmp_path: Path) -> None:
    _series(tmp_path / "ct", slices=20)
    manifest = job_request(tmp_path / "ct", "ct-tissue", tmp_path / "out").manifest
    uid, instances = manifest.series_instance_uid, list(manifest.instances)
    db = StateDB(tmp_path / "state.db")
    broker = _Broker()
    hints = PreloadHints(db, broker)  # type: ignore[arg-type]
    config = _config(tmp_path)
    lull = lull_seconds(config.completion.quiet_seconds)
    assert lull == 0.25

    _record(db, instances[:6], uid, at=100.0)
    assert hints.next_due(config) == 100.0 + lull
    assert hints.send_due(config, now=100.1) == 0  # not silent long enough
    assert hints.send_due(config, now=100.0 + lull) == 1
    (hint,) = broker.sent
    assert hint["name"] == PRELOAD
    assert hint["queue"] == "cpu"
    assert [i["path"] for i in hint["kwargs"]["instances"]] == [i.path for i in instances[:6]]
    assert hint["expires"].timestamp() == 100.0 + 2.0 + 2.0
    assert hints.next_due(config) is None
    assert hints.send_due(config, now=200.0) == 0

    _record(db, instances[6:10], uid, at=101.0)  # 10 < 2 x 6: no new hint
    assert hints.next_due(config) == 101.0 + lull
    assert hints.send_due(config, now=102.0) == 0
    assert hints.next_due(config) is None  # considered: the loop does not spin on it
    _record(db, instances[10:], uid, at=103.0)  # 20 >= 2 x 6
    assert hints.send_due(config, now=104.0) == 1
    assert len(broker.sent[-1]["kwargs"]["instances"]) == 20

    class _Away(_Broker):
        def send_task(self, name: str, **options: Any) -> None:
            raise KombuError("broker away")

    newcomer = PreloadHints(db, _Away())  # type: ignore[arg-type]
    assert newcomer.send_due(config, now=200.0) == 0  # the main loop goes on

    off = _config(tmp_path, preload=False)
    other = PreloadHints(db, broker)  # type: ignore[arg-type]
    assert other.next_due(off) is None
    assert other.send_due(off, now=200.0) == 0
    db.close()

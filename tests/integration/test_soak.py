"""Kill -9 soak: 20 SIGKILLs of the node or its worker at seeded moments across ingest,
inference and delivery, with a scanner that sends again what was not acknowledged.

At the end every acknowledged instance is recorded and spooled once, every series' latest
job is delivered and covers the whole series, and the destination received each result
instance once per version (a result of a rerun on more data is a new version, with new
UIDs). The one exception is a C-STORE that a kill cut short after the destination may
have stored it: the node records such an attempt on start-up and sends the file again, so
that instance may arrive twice, and only such an instance.
"""

from __future__ import annotations

import random
import re
import sqlite3
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread

from node.state import Job, JobStateValues, StateDB
from tests.integration.conftest import ct_node_config, make_phantom_series
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import (
    StoreSCP,
    acknowledged_files,
    build_storescu_command,
    dcmtk_env,
    run_storescu,
    wait_for,
)

pytestmark = pytest.mark.integration

SEED = 20261130
KILLS = 20
PHASES = ("ingest", "inference", "delivery")
_STORED = re.compile(r"storing DICOM file: (\S+)")


@dataclass
class Soak:
    """The node under test, its destination and what the scanner got acknowledged."""

    node: NodeProcess
    destination: StoreSCP
    workdir: Path
    rng: random.Random
    acknowledged: set[Path] = field(default_factory=set)
    #: Kills that landed in the phase they aimed at, by phase.
    hits: Counter[str] = field(default_factory=Counter)

    def kill(self, victim: str) -> None:
        if victim == "worker":
            self.node.kill_worker()  # the node starts another
        else:
            self.node.kill()
            self.node.start()

    def send_all(self, files: list[Path]) -> None:
        """Send ``files`` until each is acknowledged, as a scanner resends."""
        for _ in range(5):
            left = [path for path in files if path not in self.acknowledged]
            if not left:
                return
            sent = run_storescu(
                "127.0.0.1", self.node.port, NODE_AE_TITLE, "SCANNER", left, extra_args=["-v"]
            )
            self.acknowledged.update(acknowledged_files(sent.stderr + sent.stdout))
        raise AssertionError(f"{len(left)} files never acknowledged")

    def job_state(self, study_uid: str) -> str | None:
        with sqlite3.connect(self.node.data_dir / "state.db", timeout=30) as conn:
            row = conn.execute(
                "SELECT state FROM jobs WHERE study_instance_uid = ? ORDER BY id DESC LIMIT 1",
                (study_uid,),
            ).fetchone()
        return None if row is None else str(row[0])

    def wait_for_job_state(self, study_uid: str, state: JobStateValues) -> bool:
        """Poll until the study's job is in ``state`` (True) or past it (False)."""
        order = list(JobStateValues)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            current = self.job_state(study_uid)
            if current == state:
                return True
            if current is not None and order.index(JobStateValues(current)) > order.index(state):
                return False
            time.sleep(0.005)
        raise TimeoutError(f"the job of study {study_uid} never reached {state}")

    def ingest_round(self, files: list[Path]) -> None:
        """Kill the node while storescu sends the study, then send what was not acknowledged."""
        log = self.workdir / f"storescu-{time.monotonic_ns()}.log"
        with tempfile.TemporaryDirectory() as profile, log.open("w") as out:
            command = build_storescu_command(
                "127.0.0.1", self.node.port, NODE_AE_TITLE, "SCANNER", files,
                config_dir=Path(profile), extra_args=["-v"],
            )  # fmt: skip
            sender = subprocess.Popen(command, env=dcmtk_env(), stdout=out, stderr=out)
            received = self.rng.randint(1, len(files) // 2)  # leaves time to kill it
            wait_for(
                lambda: len(acknowledged_files(log.read_text())) >= received or sender.poll(),
                60,
                f"{received} instances acknowledged",
            )
            self.node.kill()
            cut = sender.wait(60) != 0
        self.acknowledged.update(acknowledged_files(log.read_text()))
        self.hits["ingest"] += cut
        self.node.start()
        self.send_all(files)

    def job_round(self, files: list[Path], phase: str) -> None:
        """Send the study, then kill the node or the worker while its job runs the
        model (``inference``) or while its results are being sent (``delivery``)."""
        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        self.send_all(files)
        target = JobStateValues.RUNNING if phase == "inference" else JobStateValues.RESULTS_READY
        reached = self.wait_for_job_state(study_uid, target)
        time.sleep(self.rng.uniform(0, 0.2 if phase == "inference" else 0.02))
        self.hits[phase] += reached
        self.kill(self.rng.choice(["node", "worker"]))


def _studies(folder: Path, count: int) -> Iterator[list[Path]]:
    for index in range(count):
        series = make_phantom_series(folder / f"study{index}", f"SOAK{index}")
        yield sorted(series.glob("*.dcm"))


def _received_per_uid(destination: StoreSCP) -> Counter[str]:
    """How many times storescp stored each SOP Instance (its files are named
    ``<modality>.<SOP Instance UID>``; a second copy overwrites the first file)."""
    return Counter(
        Path(name).name.split(".", 1)[1] for name in _STORED.findall(destination.log_text())
    )


def test_twenty_sigkills_lose_nothing_and_send_each_result_once(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    plan = [PHASES[index % len(PHASES)] for index in range(KILLS)]
    rng.shuffle(plan)
    studies = list(_studies(tmp_path / "studies", KILLS))
    with StoreSCP(extra_args=["-v"]) as destination:
        config = ct_node_config(tmp_path / "data", destination)
        # A job running when its worker is killed counts the run as an attempt, and the
        # node gives up after worker.max_attempts (a job that kills its worker); here the
        # kills are the test's, and one job may be under several in a row.
        config["worker"] = {"max_attempts": KILLS + 1}
        with NodeProcess(tmp_path / "node", config) as node:
            soak = Soak(node, destination, tmp_path, rng)
            for phase, files in zip(plan, studies, strict=True):
                if phase == "ingest":
                    soak.ingest_round(files)
                else:
                    soak.job_round(files, phase)
            jobs = wait_for(lambda: _settled(node, len(studies)), 300, "every series' job settled")
            received = _received_per_uid(destination)
        leftovers = list((node.data_dir / "spool" / ".incoming").iterdir())

    # The kills fell where they were aimed (each phase more than once).
    assert all(soak.hits[phase] >= 2 for phase in PHASES), soak.hits

    # Every instance the scanner sent (each acknowledged in the end) is recorded once,
    # spooled once, and in the latest job of its series; no partial file is left.
    all_files = [path for files in studies for path in files]
    assert soak.acknowledged == set(all_files)
    sent = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in all_files}
    db = StateDB(node.data_dir / "state.db", read_only=True)
    try:
        recorded = db.select("SELECT sop_instance_uid, path FROM instances")
        assert Counter(row[0] for row in recorded) == Counter(sent)
        spooled = set((node.data_dir / "spool").glob("*/*/*.dcm"))
        assert spooled == {Path(row[1]) for row in recorded}  # one file each, no stray one
        assert leftovers == []
        latest = {job.series_instance_uid: job for job in jobs}  # ordered by id
        assert len(latest) == len(studies)
        for job in latest.values():
            assert job.state == JobStateValues.DELIVERED, (job.id, job.reason)
            assert job.manifest is not None
            assert len(job.manifest.instances) == len(studies[0])

        # Each result of every delivered job reached the destination once; twice only
        # where the node recorded a send cut short by a kill.
        expected: Counter[str] = Counter()
        cut_short: set[str] = set()
        for job in jobs:
            for delivery in db.deliveries(job.id):
                uid = str(dcmread(delivery.path, stop_before_pixels=True).SOPInstanceUID)
                expected[uid] += 1
                reasons = [attempt.reason or "" for attempt in db.delivery_attempts(delivery.id)]
                if any("node stopped while sending" in reason for reason in reasons):
                    cut_short.add(uid)
    finally:
        db.close()
    assert set(received) == set(expected)
    for uid, count in received.items():
        assert count == expected[uid] or (uid in cut_short and count == expected[uid] + 1), uid


def _settled(node: NodeProcess, series: int) -> list[Job] | None:
    """The jobs, oldest first, once every series has one and none is on its way."""
    jobs = node.jobs()
    done = {JobStateValues.DELIVERED, JobStateValues.SUPERSEDED}
    if len({job.series_instance_uid for job in jobs}) < series:
        return None
    if any(job.state not in done for job in jobs):
        if any(job.state == JobStateValues.FAILED for job in jobs):
            raise AssertionError([(job.id, job.state, job.reason) for job in jobs])
        return None
    return jobs

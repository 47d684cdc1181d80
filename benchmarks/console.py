"""The console under a long history: page times with 10,000 jobs, and ingest while an
admin watches the dashboard.

Usage::

    python benchmarks/console.py [--jobs 10000] [--requests 20] [--slices 100] [--repeat 3]

A state DB with ``--jobs`` studies, each with one series, one delivered job (its worker
stage times and results recorded) and two acknowledged deliveries, is made through
:class:`node.state.StateDB` as the node would; then ``pacsnode run`` starts on it. Each
page (dashboard, studies list, a search, a study page, the failures page, the JSON
studies list, ``/metrics``) is requested ``--requests`` times and the median time is
printed against the bar of 100 ms. Then a ``--slices``-slice 512x512 CT goes to the
node by dcmtk's storescu, ``--repeat`` times with nobody watching and ``--repeat`` times
while a client loads the dashboard every second (alternating, a new series each time);
the ratio of the median ingest rates is printed against the bar of 0.95.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from typing import Self

from node.state import PlannedJob, StateDB, StudyInfo
from tests.dicom_factory import write_ct_series
from tests.node_process import NODE_AE_TITLE, NodeProcess, node_config
from tests.peers import run_storescu, wait_for
from workers.contract import JobOutcome, JobRequest, Manifest, ManifestInstance, ResultInstance

CT = "1.2.840.10008.5.1.4.1.1.2"
CALLING_AE = "SCANNER"
TIMINGS = {"load": 0.45, "inference": 3.1, "results": 0.6, "total": 4.2}


def populate(db: StateDB, jobs: int) -> None:
    """``jobs`` studies, each with a delivered job, made as the node makes them."""
    for n in range(jobs):
        study, series = f"2.25.{n + 1}", f"2.25.{n + 1}.1"
        path = Path(f"/nonexistent/{series}/1.dcm")
        db.record_instance(
            sop_instance_uid=f"{series}.1", sop_class_uid=CT, series_instance_uid=series,
            study_instance_uid=study, calling_ae_title=f"SCANNER{n % 4}", path=path, size=524_288,
            sha256=f"{n:064x}", geometry=None,
            study=StudyInfo(f"BENCH{n:05d}", f"Bench^Patient{n}", f"ACC{n}", "20261130", "CT"),
        )  # fmt: skip
        db.mark_series_complete(series)
        (job_id,) = db.route_series(
            series, [PlannedJob("ct-tissue", "ct", ["pacs"], lineage=study)]
        )
        manifest = Manifest(
            series_instance_uid=series,
            instances=(ManifestInstance(sop_instance_uid=f"{series}.1", path=str(path), size=1, sha256="0" * 64),),
        )  # fmt: skip
        request = JobRequest(job_id=job_id, model="ct-tissue", manifest=manifest, output_dir="/o")
        db.mark_job_queued(job_id, f"task-{job_id}", request)
        db.mark_job_running(job_id)
        files = tuple(
            ResultInstance(path=f"/o/job-{job_id}/{name}", study_instance_uid=study,
                           series_instance_uid=f"{series}.{k}", sop_class_uid=CT,
                           sop_instance_uid=f"{series}.{k}.1")
            for k, name in ((9, "seg-binary.dcm"), (8, "sr.dcm"))
        )  # fmt: skip
        now = time.time()
        outcome = JobOutcome(
            status="ok", files=files, timings_s=TIMINGS,
            stages_at={"load": now, "model": now + 0.4, "write": now + 3.5, "done": now + 4.1},
        )  # fmt: skip
        db.record_results(job_id, outcome, {"pacs": [Path(f.path) for f in files]})
        for delivery in db.deliveries(job_id):
            db.mark_delivery_done(delivery.id)


def make_series(folder: Path, slices: int) -> Path:
    """A ``slices`` x 512 x 512 int16 CT series (a new study), one file per slice."""
    rng = np.random.default_rng(slices)
    hu = rng.integers(-1024, 3000, size=(slices, 512, 512), dtype=np.int16)
    write_ct_series(hu, folder, spacing_mm=(1.0, 0.7, 0.7))
    return folder


def ingest_seconds(node: NodeProcess, folder: Path, stored: int) -> float:
    """storescu's wall time for the series; then ``stored`` instances must be spooled."""
    start = time.perf_counter()
    sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, CALLING_AE, folder, timeout=600)
    seconds = time.perf_counter() - start
    if sent.returncode != 0:
        raise RuntimeError(f"storescu failed: {sent.stderr[-500:]}")
    spool = node.data_dir / "spool"
    wait_for(lambda: len(list(spool.glob("*/*/*.dcm"))) >= stored, 30, f"{stored} instances")
    return seconds


def page_times(base: str, paths: list[str], count: int) -> dict[str, float]:
    """Median seconds per page over ``count`` requests (after one to warm up)."""
    medians = {}
    with requests.Session() as session:
        for path in paths:
            session.get(base + path, timeout=60).raise_for_status()
            times = []
            for _ in range(count):
                start = time.perf_counter()
                session.get(base + path, timeout=60).raise_for_status()
                times.append(time.perf_counter() - start)
            medians[path] = statistics.median(times)
    return medians


class DashboardWatcher:
    """Loads the dashboard once a second, as an admin's open browser tab does."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.stop = threading.Event()
        self.loads = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self.stop.wait(1.0):
                session.get(self.base + "/", timeout=60).raise_for_status()
                self.loads += 1

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacsnode-console-") as scratch:
        work = Path(scratch)
        data_dir = work / "data"
        start = time.perf_counter()
        db = StateDB(data_dir / "state.db")
        populate(db, args.jobs)
        db.close()
        print(f"state DB with {args.jobs} jobs made in {time.perf_counter() - start:.0f} s")
        series = [make_series(work / f"series-{n}", args.slices) for n in range(2 * args.repeat)]
        config = node_config(data_dir, port=0, quiet_seconds=30.0)
        del config["node"]["port"]
        with NodeProcess(work, config) as node:
            base = node.console_url
            wait_for(lambda: requests.get(base + "/readyz", timeout=30).ok, 120, "a ready node")
            uid = requests.get(base + "/api/studies", timeout=60).json()["studies"][0]
            pages = [
                "/", "/studies", "/studies?q=BENCH0042", f"/studies/{uid['study_instance_uid']}",
                "/failures", "/api/studies", "/metrics",
            ]  # fmt: skip
            medians = page_times(base, pages, args.requests)
            print(f"\nPage times, median of {args.requests} ({args.jobs} jobs in the DB):")
            print("| page | ms | bar (100 ms) |\n| --- | --- | --- |")
            for path, seconds in medians.items():
                shown = path if not path.startswith("/studies/2") else "/studies/{uid}"
                verdict = "met" if seconds < 0.1 else "NOT met"
                print(f"| `{shown}` | {seconds * 1000:.1f} | {verdict} |")

            rates: dict[bool, list[float]] = {False: [], True: []}
            for n, folder in enumerate(series):
                watched = n % 2 == 1
                with DashboardWatcher(base) if watched else contextlib.nullcontext():
                    seconds = ingest_seconds(node, folder, (n + 1) * args.slices)
                rates[watched].append(args.slices / seconds)
            quiet, watched_rate = (statistics.median(rates[k]) for k in (False, True))
            ratio = watched_rate / quiet
            print(
                f"\nIngest ({args.slices} x 512x512 by storescu from {CALLING_AE}, median of {args.repeat}):"
            )
            print("| dashboard | images/s | ratio |\n| --- | --- | --- |")
            print(f"| nobody watching | {quiet:.0f} | 1.00 |")
            print(f"| loaded every second | {watched_rate:.0f} | {ratio:.2f} (bar 0.95: "
                  f"{'met' if ratio >= 0.95 else 'NOT met'}) |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``/metrics``: what the node did and how long each stage took, for Prometheus.

Two sources. What the SCP sees and the DB does not keep (associations, instances and
bytes per calling AE as they arrive) is counted in this process by
:class:`ReceiveCounters`; it starts from zero at each start, as Prometheus expects of a
counter. Everything about jobs and deliveries is read from the state DB at each scrape
by :class:`NodeCollector`, so the figures always equal what ``pacsnode jobs`` and the
console show, across restarts. Label values are bounded: AE titles, model and
destination names from config.yaml, states and stage names; never UIDs.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from node.disk_guard import DiskGuard
from node.health import BrokerProbe
from node.state import IN_PROGRESS_JOB_STATES, DeliveryStateValues, StateDB

__all__ = ["STAGE_BUCKETS", "NodeCollector", "ReceiveCounters"]

#: Histogram buckets (seconds) for every stage: from a fast routing step to a long
#: inference on a CPU.
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
#: The worker's own stages (workers.pipeline: JobOutcome.timings_s); preprocess,
#: network and postprocess are the parts of inference a network model reports.
WORKER_STAGES = ("load", "inference", "preprocess", "network", "postprocess", "results")
#: Folder sizes are walked at most this often (a walk of a large spool takes a while).
_SIZE_CACHE_SECONDS = 60.0


class ReceiveCounters:
    """What the SCP counts as it goes (on the registry the console serves)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.associations = Counter(
            "pacsnode_associations",
            "Associations requested, by calling AE title and outcome (accepted or rejected).",
            ["calling_ae", "outcome"],
            registry=registry,
        )
        self.instances = Counter(
            "pacsnode_instances_received",
            "Instances stored (answered Success and recorded), by calling AE title.",
            ["calling_ae"],
            registry=registry,
        )
        self.bytes = Counter(
            "pacsnode_received_bytes",
            "Bytes of instances stored, by calling AE title.",
            ["calling_ae"],
            registry=registry,
        )


class _Histogram:
    """Observations bucketed as Prometheus wants them (cumulative), per label set."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, ...], list[int]] = {}
        self.sums: dict[tuple[str, ...], float] = {}

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        counts = self.counts.setdefault(labels, [0] * (len(STAGE_BUCKETS) + 1))
        counts[bisect.bisect_left(STAGE_BUCKETS, seconds)] += 1
        self.sums[labels] = self.sums.get(labels, 0.0) + seconds

    def family(self, name: str, documentation: str, label_names: list[str]) -> Metric:
        family = HistogramMetricFamily(name, documentation, labels=label_names)
        for labels, counts in sorted(self.counts.items()):
            cumulative, buckets = 0, []
            for bound, count in zip([*STAGE_BUCKETS, float("inf")], counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
            family.add_metric(list(labels), buckets, self.sums[labels])
        return family


#: The times of the jobs in ``{ids}`` (the first parameter: the delivered state).
_STAGE_TIMES = (
    "SELECT j.id, j.updated_at, j.model, j.state, s.first_received, s.last_received, s.completed_at, "
    "j.dispatched_at, j.started_at, j.results_at, json_extract(j.result, '$.timings_s') "
    "AS timings, (SELECT MAX(delivered_at) FROM deliveries d WHERE d.job_id = j.id "
    "AND d.state = ?) AS delivered_at FROM jobs j "
    "JOIN series s ON s.series_instance_uid = j.series_instance_uid WHERE j.id IN ({ids})"
)

#: What retention removed of a counter (state DB ``removed_totals``), added back.
_REMOVED = "SELECT first, second, count FROM removed_totals WHERE metric = '{metric}'"


def _stage_observations(row: Any) -> dict[tuple[str, str], float]:
    """One job's stage durations so far, labelled (model, stage); the delivery stages
    once no file of the job is still on its way (until the last one acknowledged)."""
    model = row["model"]
    settled = row["state"] not in IN_PROGRESS_JOB_STATES  # no file still on its way
    delivered = row["delivered_at"] if settled else None
    spans = {
        "receive_to_complete": (row["first_received"], row["completed_at"]),
        "complete_to_queued": (row["completed_at"], row["dispatched_at"]),
        "queue_wait": (row["dispatched_at"], row["started_at"]),
        "results_to_acknowledged": (row["results_at"], delivered),
        "end_to_end": (row["last_received"], delivered),
    }
    seconds = {
        stage: end - start
        for stage, (start, end) in spans.items()
        if start is not None and end is not None
    }
    if row["timings"]:
        timings = json.loads(row["timings"])
        seconds.update((stage, timings[stage]) for stage in WORKER_STAGES if stage in timings)
    return {(model, stage): value for stage, value in seconds.items() if value >= 0}


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue  # removed while walking
    return total


class NodeCollector(Collector):
    """Reads the state DB (and the disk and broker) at each scrape.

    Parameters
    ----------
    db
        The console's read-only connection to the state DB.
    disk_guard
        The free space and the guard's threshold.
    probe
        The broker's queue depths.
    folders
        Name -> folder whose size is reported (spool, results).
    """

    def __init__(
        self, db: StateDB, disk_guard: DiskGuard, probe: BrokerProbe, folders: dict[str, Path]
    ) -> None:
        self.db = db
        self.disk_guard = disk_guard
        self.probe = probe
        self.folders = folders
        self._sizes: dict[str, int] = {}
        self._sized_at = 0.0
        self._lock = threading.Lock()
        self._size_lock = threading.Lock()
        self._histogram = _Histogram()
        #: Job id -> (its updated_at, what the histogram holds of it: stage -> seconds).
        self._observed: dict[int, tuple[float, dict[tuple[str, str], float]]] = {}

    def collect(self) -> Iterator[Metric]:
        yield from self._jobs()
        yield from self._deliveries()
        yield self._stages()
        yield from self._gauges()

    def _jobs(self) -> Iterable[Metric]:
        """Finished jobs by final state (a counter), jobs on their way by state (a gauge:
        they move on)."""
        finished = CounterMetricFamily(
            "pacsnode_jobs", "Jobs finished, by model and final state.", labels=["model", "state"]
        )
        moving = GaugeMetricFamily(
            "pacsnode_jobs_in_progress",
            "Jobs not finished, by model and state (pending, queued, running, results_ready).",
            labels=["model", "state"],
        )
        for row in self.db.select(
            "SELECT model, state, SUM(n) FROM (SELECT model, state, COUNT(*) AS n FROM jobs "
            f"GROUP BY 1, 2 UNION ALL {_REMOVED.format(metric='jobs')}) GROUP BY 1, 2"
        ):
            family = moving if row[1] in IN_PROGRESS_JOB_STATES else finished
            family.add_metric([row[0], row[1]], row[2])
        yield finished
        yield moving

    def _deliveries(self) -> Iterable[Metric]:
        attempts = CounterMetricFamily(
            "pacsnode_delivery_attempts",
            "Tries to send a result file, by destination and outcome (delivered, retry, "
            "failed, cancelled, resend).",
            labels=["destination", "outcome"],
        )
        for row in self.db.select(
            "SELECT destination, outcome, SUM(n) FROM (SELECT d.destination AS destination, "
            "a.outcome AS outcome, COUNT(*) AS n FROM delivery_attempts a JOIN deliveries d "
            "ON d.id = a.delivery_id GROUP BY 1, 2 UNION ALL "
            f"{_REMOVED.format(metric='delivery_attempts')}) GROUP BY 1, 2"
        ):
            attempts.add_metric([row[0], row[1]], row[2])
        yield attempts

    def _stages(self) -> Metric:
        """Every stage of every dispatched job, as the DB's timestamps and the worker's
        own timings say; a stage not reached is not observed.

        A job's stages are read again only when its row changed (``updated_at``), so
        a scrape reads the details of new and changed jobs only: with 10,000 jobs the
        same answer in a tenth of the time. A stage is observed when it is first seen
        and again only with another duration (a job dispatched again waits in the queue
        again); nothing is taken back, not even for a job retention removed, so the
        histogram never goes down while the node runs.
        """
        with self._lock:
            current = {
                row[0]: row[1]
                for row in self.db.select(
                    "SELECT id, updated_at FROM jobs WHERE dispatched_at IS NOT NULL"
                )
            }
            for job_id in self._observed.keys() - current.keys():
                del self._observed[job_id]
            changed = [
                job_id
                for job_id, updated_at in current.items()
                if job_id not in self._observed or self._observed[job_id][0] != updated_at
            ]
            for start in range(0, len(changed), 500):
                chunk = changed[start : start + 500]
                for row in self.db.select(
                    _STAGE_TIMES.format(ids=", ".join("?" for _ in chunk)),
                    (DeliveryStateValues.DELIVERED, *chunk),
                ):
                    seen = self._observed.get(row["id"], (0.0, {}))[1]
                    stages = _stage_observations(row)
                    for labels, seconds in stages.items():
                        if seen.get(labels) != seconds:
                            self._histogram.observe(labels, seconds)
                    self._observed[row["id"]] = (row["updated_at"], {**seen, **stages})
            return self._histogram.family(
                "pacsnode_stage_seconds",
                "Seconds each stage took, per model: receive_to_complete (first instance to "
                "complete), complete_to_queued, queue_wait, the worker's load (read, check "
                "against the manifest, decode), inference (of which preprocess, network, postprocess for a network model) "
                "and results, results_to_acknowledged (last delivery) and "
                "end_to_end (last instance to last delivery acknowledged).",
                ["model", "stage"],
            )

    def _gauges(self) -> Iterable[Metric]:
        space = self.disk_guard.space()
        yield GaugeMetricFamily(
            "pacsnode_disk_free_bytes", "Free bytes on the data folder's file system.",
            value=space.free_bytes,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "pacsnode_disk_guard_bytes",
            "Free space below which new instances are refused (storage.min_free_*).",
            value=space.threshold_bytes,
        )
        sizes = GaugeMetricFamily(
            "pacsnode_folder_bytes", "Bytes in the node's folders.", labels=["folder"]
        )
        for name, size in self._folder_sizes().items():
            sizes.add_metric([name], size)
        yield sizes
        depth = GaugeMetricFamily(
            "pacsnode_queue_depth", "Tasks waiting in each broker queue.", labels=["queue"]
        )
        for queue, count in self.probe.view.queue_depth.items():
            depth.add_metric([queue], count)
        yield depth
        oldest = self.db.select(
            "SELECT MIN(created_at) FROM deliveries WHERE state = ?", (DeliveryStateValues.PENDING,)
        )[0][0]
        yield GaugeMetricFamily(
            "pacsnode_oldest_pending_delivery_seconds",
            "Age of the oldest delivery not yet acknowledged (0: none pending).",
            value=0.0 if oldest is None else time.time() - oldest,
        )

    def _folder_sizes(self) -> dict[str, int]:
        with self._size_lock:
            if time.monotonic() - self._sized_at > _SIZE_CACHE_SECONDS:
                self._sizes = {name: _folder_bytes(path) for name, path in self.folders.items()}
                self._sized_at = time.monotonic()
            return dict(self._sizes)

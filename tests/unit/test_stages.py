"""The stage gate of the overlapping worker (:mod:`workers.stages`), with real processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers import stages

_SPAN = 0.15


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "stages"
    stages.configure(None)


def _job(directory: Path, lanes: int, log: multiprocessing.Queue[tuple[str, float, float]]) -> None:
    stages.configure(directory, lanes)
    with stages.job_stages() as job:
        for stage in stages.STAGES:
            job.enter(stage)
            start = time.time()
            time.sleep(_SPAN)
            log.put((stage, start, time.time()))


def _run_jobs(directory: Path, lanes: int, count: int) -> dict[str, list[tuple[float, float]]]:
    context = multiprocessing.get_context("fork")
    log: multiprocessing.Queue[tuple[str, float, float]] = context.Queue()
    processes = [context.Process(target=_job, args=(directory, lanes, log)) for _ in range(count)]
    for process in processes:
        process.start()
    spans: dict[str, list[tuple[float, float]]] = {stage: [] for stage in stages.STAGES}
    for _ in range(count * len(stages.STAGES)):
        stage, start, end = log.get(timeout=30)
        spans[stage].append((start, end))
    for process in processes:
        process.join(10)
    return spans


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    busiest = current = 0
    for _, change in events:
        current += change
        busiest = max(busiest, current)
    return busiest


@pytest.mark.parametrize("lanes", [1, 2])
def test_each_stage_holds_one_job_per_lane_while_the_stages_overlap(gate: Path, lanes: int) -> None:
    spans = _run_jobs(gate, lanes, count=3 * lanes)
    for stage in stages.STAGES:
        assert _most_at_once(spans[stage]) == lanes, stage
    everything = [span for stage_spans in spans.values() for span in stage_spans]
    assert _most_at_once(everything) > lanes  # other stages ran beside the model
    total = max(end for _, end in everything) - min(start for start, _ in everything)
    assert total < 3 * lanes * len(stages.STAGES) * _SPAN  # faster than one after the other


def test_a_killed_job_releases_its_slot(gate: Path) -> None:
    stages.configure(gate, 1)
    context = multiprocessing.get_context("fork")
    holding = context.Event()

    def hold_the_model() -> None:
        with stages.job_stages() as job:
            job.enter("model")
            holding.set()
            time.sleep(60)

    process = context.Process(target=hold_the_model)
    process.start()
    assert holding.wait(10)
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)
    process.join(10)
    started = time.monotonic()
    with stages.job_stages() as job:
        job.enter("model")
    assert time.monotonic() - started < 5


def test_stages_are_taken_in_order() -> None:
    with stages.job_stages() as job:
        job.enter("model")
        with pytest.raises(ValueError, match="'load' entered after 'model'"):
            job.enter("load")


def test_without_a_gate_nothing_waits() -> None:
    with stages.job_stages() as job:
        for stage in stages.STAGES:
            job.enter(stage)
        assert set(job.waited_s) == set(stages.STAGES)
        assert max(job.waited_s.values()) < 0.1

"""The stages of a job and the gate that lets one worker overlap jobs.

A job has three stages: ``load`` (verify and decode its input), ``model`` (inference)
and ``write`` (result files). With ``worker.overlap`` a worker runs three job processes
per lane: while one runs the model on job N, another loads job N+1 and a third writes job
N-1's results, so the GPU does not wait on the CPU work around it. Each stage holds one
job per lane at a time, and a job takes its next stage's slot before it gives up its
current one: at most one loaded volume waits for the model, and a job whose results
cannot be written yet keeps the model (back-pressure rather than a growing backlog).
Stages are always taken in this order, so no job waits on one that waits on it.

Slots are ``flock`` locks on files in a folder private to the worker: the kernel
releases them when a process dies, so a job process killed mid-stage blocks nobody.
Without :func:`configure` (the serial worker, tests, ``evaluate``) the gate is open.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["STAGES", "JobStages", "configure", "job_stages"]

#: The stages in the order every job takes them.
STAGES = ("load", "model", "write")
#: How often a process waiting for one of several slots tries them again.
_POLL_SECONDS = 0.002


class _Gate:
    directory: Path | None = None
    lanes = 1


def configure(directory: Path | None, lanes: int = 1) -> None:
    """Share the stage slots of ``lanes`` lanes through lock files in ``directory``
    (a worker's private folder, made before its job processes fork); None opens the gate."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    _Gate.directory = directory
    _Gate.lanes = lanes


def _acquire(stage: str) -> IO[bytes] | None:
    """Block until one of the stage's slots is free and hold it (the open lock file)."""
    if _Gate.directory is None:
        return None
    paths = [_Gate.directory / f"{stage}-{lane}.lock" for lane in range(_Gate.lanes)]
    if len(paths) == 1:
        handle = open(paths[0], "ab")  # noqa: SIM115 - held until the stage ends
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle
    offset = os.getpid() % len(paths)  # spread the first tries over the lanes
    while True:
        for index in range(len(paths)):
            handle = open(paths[(offset + index) % len(paths)], "ab")  # noqa: SIM115
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            return handle
        time.sleep(_POLL_SECONDS)


def _return_gpu_memory() -> None:
    """Hand the memory torch's allocator keeps after inference back to the GPU, for the
    job process that takes the model stage next."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _release(handle: IO[bytes] | None) -> None:
    if handle is not None:
        handle.close()  # closing the file releases its flock


class JobStages:
    """One job's way through the stages: :meth:`enter` each in turn; the slot of the
    previous stage is released once the next one is held, and the last on :meth:`close`.
    """

    def __init__(self) -> None:
        self._held: IO[bytes] | None = None
        self._stage = -1
        #: Stage -> when the job took its slot (epoch seconds).
        self.entered: dict[str, float] = {}
        #: Stage -> seconds the job waited for its slot.
        self.waited_s: dict[str, float] = {}

    def enter(self, stage: str) -> None:
        """Wait for a slot of ``stage`` (the next in :data:`STAGES`), then release the
        one held.

        Raises
        ------
        ValueError
            If ``stage`` is not the next one (a stage skipped or taken twice could
            deadlock two jobs).
        """
        index = STAGES.index(stage)
        if index <= self._stage:
            raise ValueError(f"stage {stage!r} entered after {STAGES[self._stage]!r}")
        asked = time.time()
        held = _acquire(stage)
        self.entered[stage] = time.time()
        self.waited_s[stage] = self.entered[stage] - asked
        if self._stage == STAGES.index("model") and _Gate.directory is not None:
            _return_gpu_memory()
        _release(self._held)
        self._held, self._stage = held, index

    def close(self) -> None:
        _release(self._held)
        self._held = None


@contextlib.contextmanager
def job_stages() -> Iterator[JobStages]:
    """A job's :class:`JobStages`, whose last slot is released however the job ends."""
    stages = JobStages()
    try:
        yield stages
    finally:
        stages.close()

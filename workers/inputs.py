"""A job's input: its manifest's files, read once and checked, or decoded ahead of it.

Every file a job reads goes through :func:`manifest_reader`: the bytes are decoded only
if their size and SHA-256 are those the node recorded, so a job decodes exactly its
input.

**Decoding during the quiet period.** The node creates a series' job only when the
series has been silent for ``completion.quiet_seconds``; reading, checking and decoding
a 300-slice CT then takes the worker another half second on two cores. So once a series
has been silent for a moment the node sends a hint (:data:`workers.contract.PRELOAD`,
``worker.preload``) naming the instances it has, and a free job process loads them as
a job would (:func:`preload`, every file checked against the node's digests) and leaves
the volume and headers in the worker's preload folder in shared memory. A job whose
manifest names exactly those files with those digests takes the series from there
(:func:`take`) instead of reading the files again: the same bytes decoded the same way,
so the same results.

A hint is only a hint. It expires; a hint that is missed, fails or names other
instances than the job's manifest costs only the load it would have saved; an entry is
used once. The folder holds at most :data:`CAPACITY` series: when it is full a hint is
dropped, so that a batch of studies keeps the first ones loaded for the jobs that come
first, and a series whose job has not come for :data:`MAX_AGE_SECONDS` (it went to
another worker, or routing chose another series) goes. The folder belongs to one
worker and is private to its user (0700; the headers are pickled there, and read back
only from there); a worker starting up removes the folders of workers that are gone
(killed ones too).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.config import disable_value_validation

from workers.contract import ManifestInstance
from workers.series import FileReader, LoadedSeries, SeriesError, load_series

__all__ = [
    "CAPACITY",
    "MAX_AGE_SECONDS",
    "ManifestError",
    "create_preload_folder",
    "manifest_reader",
    "preload",
    "take",
    "use_preload_folder",
]

logger = logging.getLogger(__name__)

#: Series a worker keeps decoded for their jobs at most (a 300-slice 512x512 CT is
#: 300 MiB of float32).
CAPACITY = 2
#: Free space /dev/shm needs to hold the preload folder (else the temporary folder).
_SHM_NEEDED_BYTES = 1 << 30
#: How long a preloaded series waits for its job before it is removed.
MAX_AGE_SECONDS = 300.0
_PREFIX = "pacsnode-preload-"
_VOXELS = "voxels.npy"
_LOADING = ".loading-"
_TAKEN = ".taken-"
#: The longest a job waits for a preload of its series that is under way.
_WAIT_SECONDS = 5.0
_HEADERS = "headers.pickle"


class ManifestError(Exception):
    """A file of the job's input is missing or no longer holds the bytes it was given."""


def manifest_reader(instances: Sequence[ManifestInstance]) -> FileReader:
    """A reader of the files of ``instances`` for :func:`workers.series.load_series`:
    it returns a file's bytes only if they are exactly those recorded for it.

    The reader raises :class:`ManifestError` if a file is missing or its size or
    SHA-256 differs (the instance was re-sent with other content after the job was
    created; a newer version covers that), or is not one of ``instances``.
    """
    expected = {Path(i.path): i for i in instances}

    def read(path: Path) -> bytes:
        instance = expected.get(path)
        if instance is None:
            raise ManifestError(f"{path} is not an input of the job")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ManifestError(
                f"instance {instance.sop_instance_uid} of the job's input is missing "
                f"({path}: {exc.strerror or exc})"
            ) from exc
        # hashlib releases the GIL: the loader's other threads parse meanwhile.
        if len(data) != instance.size or hashlib.sha256(data).hexdigest() != instance.sha256:
            raise ManifestError(
                f"instance {instance.sop_instance_uid} changed after the job was created "
                "(re-sent with other content); the job's results would not match its "
                "input, so it does not run (a newer version covers the new content)"
            )
        return data

    return read


class _Folder:
    path: Path | None = None


def use_preload_folder(path: Path | None) -> None:
    """Keep preloaded series in ``path`` (an existing folder private to this worker);
    None turns preloading off."""
    _Folder.path = path


def create_preload_folder() -> Path:
    """Make this worker's preload folder (in ``/dev/shm``, which is memory, where it has
    room for :data:`CAPACITY` large series; else in the temporary folder) and use it; call it before the job processes fork. Folders left by worker
    processes that are gone are removed first; this one goes when the worker exits."""
    shm = Path("/dev/shm")
    usable = shm.is_dir() and os.access(shm, os.W_OK)
    # A container's /dev/shm is often 64 MiB: too small, the temporary folder it is.
    big_enough = usable and shutil.disk_usage(shm).free >= _SHM_NEEDED_BYTES
    base = shm if big_enough else Path(tempfile.gettempdir())
    for folder in base.glob(f"{_PREFIX}*"):
        pid = folder.name.removeprefix(_PREFIX).partition("-")[0]
        with contextlib.suppress(OSError):
            if pid.isdigit() and folder.stat().st_uid == os.getuid() and not _alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base))  # mode 0700
    atexit.register(_remove_if_owner, path, os.getpid())
    use_preload_folder(path)
    return path


def _remove_if_owner(path: Path, owner: int) -> None:
    """At exit: remove the folder if this is the worker that made it (not a job
    process forked from it)."""
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _key(instances: Sequence[ManifestInstance]) -> str:
    """The entry name of exactly these files with these digests."""
    digest = hashlib.sha256()
    for instance in sorted(instances, key=lambda i: i.path):
        digest.update(f"{instance.path}\0{instance.size}\0{instance.sha256}\n".encode())
    return digest.hexdigest()


def _entry(instances: Sequence[ManifestInstance]) -> tuple[Path, str] | None:
    """The preload folder and the entry name of ``instances``; None when preloading is
    off or there are none."""
    folder = _Folder.path
    if folder is None or not instances:
        return None
    return folder, _key(instances)


def preload(instances: Sequence[ManifestInstance]) -> bool:
    """Load the series of ``instances`` as its job would and leave it for that job.

    Returns False, having left nothing, when preloading is off, the series is there or
    being loaded already, or it cannot be loaded (its job will meet and report the same
    problem).
    """
    where = _entry(instances)
    if where is None:
        return False
    folder, key = where
    entry = folder / key
    staging = folder / f"{_LOADING}{os.getpid()}-{key}"
    held = _tidy(folder)
    if entry.exists() or any(folder.glob(f"{_LOADING}*-{key}")):
        return False
    if held >= CAPACITY:
        logger.info("not preloaded: %d series wait for their jobs already", CAPACITY)
        return False
    try:
        staging.mkdir()
        series = load_series(
            [Path(i.path) for i in instances],
            manifest_reader(instances),
            allocate=lambda shape: _mapped_volume(staging / _VOXELS, shape),
        )
        headers = (
            dataclasses.replace(series.volume, voxels=np.empty(0, np.float32)),
            series.datasets,
        )
        (staging / _HEADERS).write_bytes(pickle.dumps(headers, pickle.HIGHEST_PROTOCOL))
        staging.rename(entry)
    except (ManifestError, SeriesError, OSError) as exc:  # OSError: shared memory full
        shutil.rmtree(staging, ignore_errors=True)
        logger.info("not preloaded: %s", exc)
        return False
    logger.info(
        "preloaded series %s (%d instances)",
        series.datasets[0].get("SeriesInstanceUID", "?"),
        len(instances),
    )
    return True


def _mapped_volume(path: Path, shape: tuple[int, int, int]) -> npt.NDArray[np.float32]:
    """A float32 array of ``shape`` mapped from a new ``.npy`` file at ``path``, which
    the job maps in turn: the series is decoded straight into it, with no copy to save.

    Raises
    ------
    OSError
        If the file system cannot hold it. Its space is reserved before the array is
        used: a mapped page that a full tmpfs cannot back would kill the process
        (SIGBUS) instead.
    """
    voxels = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, path.stat().st_size)
    finally:
        os.close(fd)
    return voxels


def _tidy(folder: Path) -> int:
    """Remove series older than :data:`MAX_AGE_SECONDS` and what job processes that died
    while loading or taking a series left; returns how many series are there or being
    loaded."""
    held = 0
    now = time.time()
    for entry in folder.iterdir():
        owner = _owner(entry.name, _LOADING) or _owner(entry.name, _TAKEN)
        with contextlib.suppress(OSError):
            if owner is not None:
                if not _alive(owner):
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    held += entry.name.startswith(_LOADING)
            elif now - entry.stat().st_mtime > MAX_AGE_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
            else:
                held += 1
    return held


def _owner(name: str, prefix: str) -> int | None:
    """The pid of the process loading (``_LOADING``) or taking (``_TAKEN``) a series
    into a folder of this name."""
    if not name.startswith(prefix):
        return None
    pid = name.removeprefix(prefix).partition("-")[0]
    return int(pid) if pid.isdigit() else None


def _wait_for_loading(folder: Path, key: str) -> None:
    """Wait while another job process is preloading ``key`` (it is nearly done more
    often than not: the job came at the end of the quiet period), at most
    :data:`_WAIT_SECONDS`."""
    deadline = time.monotonic() + _WAIT_SECONDS
    while time.monotonic() < deadline:
        loaders = [_owner(p.name, _LOADING) for p in folder.glob(f"{_LOADING}*-{key}")]
        if not any(pid is not None and _alive(pid) for pid in loaders):
            return
        time.sleep(0.005)


def take(instances: Sequence[ManifestInstance]) -> LoadedSeries | None:
    """The series preloaded from exactly ``instances`` (each file's path, size and
    SHA-256), removed from the folder; None if there is none."""
    where = _entry(instances)
    if where is None:
        return None
    folder, key = where
    entry = folder / key
    claimed = folder / f"{_TAKEN}{os.getpid()}-{key}"
    started = time.monotonic()
    if not entry.exists():
        _wait_for_loading(folder, key)
    waited = time.monotonic() - started
    try:
        entry.rename(claimed)  # atomic: one job takes it, eviction no longer sees it
    except OSError:
        return None
    try:
        # Mapped copy-on-write: pages are shared with the folder's until written, and
        # stay valid once the file is removed.
        voxels = np.load(claimed / _VOXELS, mmap_mode="c").view(np.ndarray)
        with disable_value_validation():  # validated when the files were read
            volume, datasets = pickle.loads((claimed / _HEADERS).read_bytes())
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        logger.warning("preloaded series unusable, loading it again: %s", exc)
        return None
    finally:
        shutil.rmtree(claimed, ignore_errors=True)
    logger.info(
        "took the preloaded series (%d instances) in %.2f s, %.2f s of it waiting for its preload",
        len(instances),
        time.monotonic() - started,
        waited,
    )
    return LoadedSeries(volume=dataclasses.replace(volume, voxels=voxels), datasets=datasets)

"""The spool: received instances on disk, exactly as the peer sent them.

Layout: ``<data_dir>/spool/<study UID>/<series UID>/<SOP instance UID>_<digest>.dcm``,
where ``<digest>`` is the first 16 hex digits of the file's SHA-256. Files are written to
``spool/.incoming`` first, fsynced, then renamed into place, so a file in the tree is
always whole. UIDs are checked before they become path parts. This module is the only
one that knows the layout: the rest of pacsnode names instances by the paths the state
DB recorded (a job by its manifest).

A file is never changed once written: an instance re-sent with other bytes gets a file
of its own, so the files a job's manifest names keep exactly the bytes it was given
(a crash between the write and the state DB record leaves the DB and its files
consistent), and the state DB points at the newest copy.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["InvalidUIDError", "Spool", "SpooledFile", "SpooledInstance", "check_uid"]

logger = logging.getLogger(__name__)

# UIDs hold only digits and dots, so "_" cannot be part of one.
_DIGEST_SEPARATOR = "_"
_DIGEST_CHARS = 16
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# Zero-padded, not stripped: what we write is exactly what the peer sent.
_PREAMBLE = b"\x00" * 128 + b"DICM"
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC


class InvalidUIDError(ValueError):
    """A UID that is not a valid DICOM UID (and so may not become a file name)."""


def check_uid(value: str, name: str) -> str:
    """Return ``value`` if it is a valid DICOM UID.

    Raises
    ------
    InvalidUIDError
        If it is empty, longer than 64 characters, or not dot-separated numbers without
        leading zeros.
    """
    value = value.strip().rstrip("\x00")
    if not value or len(value) > 64 or not _UID.match(value):
        raise InvalidUIDError(f"{name} {value[:80]!r} is not a valid DICOM UID")
    return value


@dataclass(frozen=True)
class SpooledFile:
    """A file the spool wrote: where, how many bytes, and their SHA-256 (hex), the same
    as :func:`workers.contract.file_digest` of the file."""

    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class SpooledInstance:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    path: Path


class Spool:
    """Atomic, durable writes of received instances.

    Parameters
    ----------
    root
        ``<data_dir>/spool``; created if missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()

    def check_uids(
        self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str
    ) -> None:
        """Raise :class:`InvalidUIDError` unless all three may become path parts."""
        check_uid(study_instance_uid, "StudyInstanceUID")
        check_uid(series_instance_uid, "SeriesInstanceUID")
        check_uid(sop_instance_uid, "SOPInstanceUID")

    def path_for(
        self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str, sha256: str
    ) -> Path:
        """Where the file of an instance with these bytes (their SHA-256) lives."""
        self.check_uids(study_instance_uid, series_instance_uid, sop_instance_uid)
        return (
            self.root
            / study_instance_uid
            / series_instance_uid
            / f"{sop_instance_uid}{_DIGEST_SEPARATOR}{sha256[:_DIGEST_CHARS]}.dcm"
        )

    def write(
        self,
        *,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        file_meta: bytes,
        dataset: memoryview | bytes,
    ) -> SpooledFile:
        """Write preamble, file meta and dataset; return the file once durable.

        A file's name holds (the first 64 bits of) the digest of its bytes, so when the
        file for these bytes is there (only a complete, fsynced file gets its name),
        nothing is written: an identical re-send. Other bytes of the same instance go to a file of their own.

        Raises
        ------
        InvalidUIDError
            If a UID is not valid.
        OSError
            If anything cannot be written (disk full included); nothing is left behind.
        """
        head = _PREAMBLE + file_meta
        digest = hashlib.sha256(head)
        digest.update(dataset)
        sha256 = digest.hexdigest()
        final = self.path_for(study_instance_uid, series_instance_uid, sop_instance_uid, sha256)
        spooled = SpooledFile(final, len(head) + memoryview(dataset).nbytes, sha256)
        temporary = self.incoming / f"{uuid.uuid4().hex}.part"
        if final.is_file():
            return spooled  # an identical re-send: the durable copy is already there
        try:
            fd = os.open(temporary, _CREATE_FLAGS, 0o666)
            try:
                _write_all(fd, (head, dataset))
                os.fsync(fd)
            finally:
                os.close(fd)
            directory = final.parent
            if directory not in self._known_dirs:
                self._make_dir(directory)
            try:
                os.replace(temporary, final)
            except FileNotFoundError:
                # Its folder went since (retention, maybe in `pacsnode cleanup`).
                self._make_dir(directory)
                os.replace(temporary, final)
            _fsync_dir(directory)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return spooled

    def _make_dir(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        _fsync_dir(directory.parent)
        _fsync_dir(directory.parent.parent)
        self._known_dirs.add(directory)

    def remove_study(self, study_instance_uid: str) -> int:
        """Delete a study's folder (retention): every file of it, replaced copies
        included; its folders are forgotten as known. Returns how many files went."""
        folder = self.root / check_uid(study_instance_uid, "StudyInstanceUID")
        files = sum(1 for _ in folder.glob("*/*.dcm"))
        self._known_dirs = {d for d in self._known_dirs if folder not in d.parents}
        shutil.rmtree(folder, ignore_errors=True)
        return files

    def clean_incoming(self) -> int:
        """Remove partial files left by a crash; returns how many."""
        removed = 0
        for leftover in self.incoming.glob("*.part"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def scan(self) -> Iterator[SpooledInstance]:
        """Every whole instance in the spool, named by its path."""
        for path in self.root.glob("*/*/*.dcm"):
            yield SpooledInstance(
                study_instance_uid=path.parent.parent.name,
                series_instance_uid=path.parent.name,
                sop_instance_uid=path.stem.split(_DIGEST_SEPARATOR, 1)[0],
                path=path,
            )


def _write_all(fd: int, chunks: tuple[bytes | memoryview, ...]) -> None:
    """Write every byte of `chunks` to `fd`, in as few system calls as it takes.

    Raises
    ------
    OSError
        If the file system takes nothing (ENOSPC) or fails.
    """
    views = [memoryview(chunk).cast("B") for chunk in chunks if len(chunk)]
    while views:
        written = os.writev(fd, views)
        if written == 0:
            raise OSError(errno.ENOSPC, "no space left on device: wrote nothing")
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The disk guard: no new instance is accepted while the data folder's disk is short.

A node that finds out the disk is full by failing a write has already stopped working
for everyone: the state DB, the results being written and the deliveries share that
disk. So before writing a received instance the SCP asks the guard, which compares the
file system's free space, less the instance's size, with ``storage.min_free_bytes`` /
``storage.min_free_percent``; below it the instance is refused with Out of Resources
(0xA700), which a sender retries later, and once per association a warning names the
free space. Nothing else stops: jobs run, results are written and deliveries go out, and
as soon as space is back the next instance is accepted, without a restart.
"""

from __future__ import annotations

import logging
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path

from node.config import StorageSettings

__all__ = ["DiskGuard", "DiskSpace", "format_bytes"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskSpace:
    """Free space of the data folder's file system against the guard's threshold."""

    free_bytes: int
    total_bytes: int
    threshold_bytes: int

    @property
    def low(self) -> bool:
        return self.free_bytes < self.threshold_bytes

    def describe(self) -> str:
        return (
            f"{format_bytes(self.free_bytes)} free of {format_bytes(self.total_bytes)}, below the disk "
            f"guard of {format_bytes(self.threshold_bytes)} (storage.min_free_bytes / "
            "storage.min_free_percent)"
        )


def format_bytes(count: int) -> str:
    """A size as people read it: GiB from 1 GiB up, else MiB."""
    return f"{count / 2**30:.2f} GiB" if abs(count) >= 2**30 else f"{count / 2**20:.1f} MiB"


class DiskGuard:
    """Answers, per received instance, whether it may be written."""

    def __init__(self, folder: Path, settings: StorageSettings) -> None:
        self.folder = folder
        self.settings = settings
        self._warned: weakref.WeakSet[object] = weakref.WeakSet()
        #: The size of the last instance refused, until one is accepted again.
        self._refused_bytes = 0

    def space(self, incoming_bytes: int = 0) -> DiskSpace:
        """The free space once ``incoming_bytes`` more were written."""
        usage = shutil.disk_usage(self.folder)
        return DiskSpace(
            usage.free - incoming_bytes,
            usage.total,
            self.settings.threshold_bytes(usage.total),
        )

    def status(self) -> DiskSpace:
        """The free space as the guard judges it now (readiness, the console's banner):
        less the size of the last instance it refused, until one is accepted again, so
        that a guard refusing 130 KiB instances is not reported fine with 100 KiB to
        spare above its line."""
        return self.space(self._refused_bytes)

    def refusal(self, incoming_bytes: int, association: object) -> str | None:
        """Why an instance of ``incoming_bytes`` must be refused, or None to accept it;
        the first refusal on ``association`` is logged as a warning."""
        space = self.space(incoming_bytes)
        if not space.low:
            self._refused_bytes = 0
            return None
        self._refused_bytes = incoming_bytes
        reason = f"disk nearly full: {space.describe()}"
        if association not in self._warned:
            self._warned.add(association)
            logger.warning("refusing new instances on this association: %s", reason)
        return reason

"""Completeness: a series with no new instance for ``quiet_seconds`` is complete.

Instances that arrive later are kept and counted by the state DB, not processed.
"""

from __future__ import annotations

import logging
import time

from node.state import StateDB

__all__ = ["mark_quiet_series_complete"]

logger = logging.getLogger(__name__)


def mark_quiet_series_complete(db: StateDB, quiet_seconds: float, now: float | None = None) -> int:
    """Mark every series with no instance for ``quiet_seconds`` complete; returns how many."""
    cutoff = (time.time() if now is None else now) - quiet_seconds
    quiet = db.series_quiet_since(cutoff)
    for series in quiet:
        db.mark_series_complete(series.series_instance_uid)
        logger.info(
            "series %s complete",
            series.series_instance_uid,
            extra={"series_instance_uid": series.series_instance_uid},
        )
    return len(quiet)

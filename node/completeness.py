"""Completeness: when a series counts as complete, and evidence that it is not.

A series with no new instance for ``quiet_seconds`` is complete
(:func:`mark_quiet_series_complete`); a peer flagged ``complete_on_release`` completes
its series sooner, when it releases its association (:mod:`node.handlers`). Before a
volume model runs, :func:`missing_slices` looks for a hole in the stack: a series whose
slice positions jump by a multiple of the series' own spacing waits one more quiet
period, then its job fails naming the missing position. What happens to instances that
arrive after completion is the state DB's business (``completion.late``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from node.state import StateDB

__all__ = ["GAP_FACTOR", "mark_quiet_series_complete", "missing_slices"]

logger = logging.getLogger(__name__)

#: A step between neighbouring slices this many times the series' usual step (its
#: median) or more means at least one slice is missing.
GAP_FACTOR = 1.5


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


def missing_slices(
    positions: Sequence[Sequence[float]], orientation: Sequence[float]
) -> list[tuple[float, float, float]]:
    """Where slices are missing from a stack of parallel slices.

    Parameters
    ----------
    positions
        ImagePositionPatient of each slice (mm), in any order.
    orientation
        The stack's ImageOrientationPatient (row and column direction cosines).

    Returns
    -------
    list[tuple[float, float, float]]
        The ImagePositionPatient each missing slice would have, in stack order: for
        every step between neighbours of :data:`GAP_FACTOR` times the median step or
        more, the positions that divide it into steps of about that median. Empty for
        fewer than three slices (no spacing to judge by).
    """
    if len(positions) < 3:
        return []
    points = np.asarray(positions, dtype=np.float64)
    cosines = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(cosines[:3], cosines[3:])
    order = np.argsort(points @ normal)
    points = points[order]
    steps = np.diff(points @ normal)
    spacing = float(np.median(steps))
    if spacing <= 1e-3:
        return []  # duplicates or a single position: not a stack to judge
    missing = []
    for index, step in enumerate(steps):
        if step < GAP_FACTOR * spacing:
            continue
        count = round(step / spacing)
        for part in range(1, count):
            point = points[index] + (points[index + 1] - points[index]) * part / count
            missing.append((float(point[0]), float(point[1]), float(point[2])))
    return missing

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
from pydicom import Dataset
from pydicom.multival import MultiValue

from node.state import StateDB

__all__ = [
    "GAP_FACTOR",
    "NOT_JUDGED",
    "decode_geometry",
    "encode_geometry",
    "geometry_of",
    "mark_quiet_series_complete",
    "missing_slices",
]

logger = logging.getLogger(__name__)

#: A step between neighbouring slices this many times the series' usual step (its
#: median) or more means at least one slice is missing.
GAP_FACTOR = 1.5


#: The recorded geometry of an instance the gap check does not judge: no patient
#: geometry, or a multi-frame image (its frames have their own positions).
NOT_JUDGED = ""


def encode_geometry(position: str | None, orientation: str | None, frames: str | None) -> str:
    """An instance's geometry as the state DB records it on receipt, from the header's
    ImagePositionPatient, ImageOrientationPatient and NumberOfFrames values as text
    (backslash-separated), so the gap check needs no file: "position|orientation", or
    :data:`NOT_JUDGED`."""
    try:
        multi_frame = int((frames or "1").strip() or "1") > 1
    except ValueError:
        return NOT_JUDGED
    if multi_frame or not position or not orientation:
        return NOT_JUDGED
    return f"{position.strip()}|{orientation.strip()}"


def geometry_of(header: Dataset) -> str:
    """:func:`encode_geometry` of a header read by pydicom (an unreadable value: not
    judged)."""

    def text(keyword: str) -> str | None:
        value = header.get(keyword)
        if value is None:
            return None
        if isinstance(value, (list, MultiValue)):
            return "\\".join(str(v) for v in value)
        return str(value)

    try:
        return encode_geometry(
            text("ImagePositionPatient"), text("ImageOrientationPatient"), text("NumberOfFrames")
        )
    except (ValueError, TypeError):
        return NOT_JUDGED


def decode_geometry(geometry: str) -> tuple[list[float], list[float]] | None:
    """(position, orientation) of a recorded geometry; None when not judged or not
    three and six numbers."""
    position, _, orientation = geometry.partition("|")
    try:
        numbers = (
            [float(v) for v in position.split("\\")],
            [float(v) for v in orientation.split("\\")],
        )
    except ValueError:
        return None
    return numbers if (len(numbers[0]), len(numbers[1])) == (3, 6) else None


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

"""Completeness and routing: a series quiet for ``quiet_seconds`` is complete, then routed.

Routing reads one instance's header from the spool (never pixel data), applies the rules,
checks the series against what each chosen model accepts (modality, orientation, number
of slices) and creates the jobs; a job a model cannot take is recorded as skipped with
the reason, and a series no rule matches as ignored.
"""

from __future__ import annotations

import logging
import time

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from models.base import orientation_of
from models.registry import get_model_class
from node.config import Config
from node.rules import route_series
from node.state import PlannedJob, SeriesStateValues, StateDB

__all__ = ["mark_quiet_series_complete", "route_complete_series"]

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


def _skip_reason(model: str, header: Dataset, instance_count: int) -> str | None:
    """Why ``model`` does not take this series (from its ``accepts``), or None."""
    try:
        orientation = orientation_of([float(v) for v in header.ImageOrientationPatient])
    except (AttributeError, TypeError, ValueError):
        orientation = None
    return get_model_class(model).accepts.reject_reason(
        modality=str(header.get("Modality", "")), orientation=orientation, slices=instance_count
    )


def route_complete_series(db: StateDB, config: Config) -> list[int]:
    """Apply the rules to every complete series; returns the ids of the jobs created."""
    created: list[int] = []
    for series in db.series_in_state(SeriesStateValues.COMPLETE):
        uid = series.series_instance_uid
        paths = db.instance_paths(uid)
        if not paths:
            db.route_series(uid, [], reason="no instances on disk")
            continue
        try:
            header = dcmread(paths[0], stop_before_pixels=True)
        except (OSError, InvalidDicomError, EOFError, ValueError) as exc:
            reason = f"cannot read the header of {paths[0].name}: {exc}"
            logger.warning("series %s ignored: %s", uid, reason)
            db.route_series(uid, [], reason=reason)
            continue
        routed = route_series(config.rules, header, len(paths))
        if not routed:
            db.route_series(uid, [], reason="no rule matches")
            logger.info("series %s ignored: no rule matches", uid)
            continue
        planned = [
            PlannedJob(
                r.model,
                ",".join(r.rules),
                r.destinations,
                _skip_reason(r.model, header, len(paths)),
            )
            for r in routed
        ]
        for job in planned:
            if job.skipped_reason is not None:
                logger.info("series %s skipped by %s: %s", uid, job.model, job.skipped_reason)
        ids = db.route_series(uid, planned)
        if ids:
            logger.info(
                "series %s routed to %s",
                uid,
                ", ".join(j.model for j in planned if j.skipped_reason is None),
            )
        created.extend(ids)
    return created

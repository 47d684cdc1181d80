"""Routing: complete studies -> jobs, by the rules and by what each model accepts.

A study is routed once none of its series is still receiving, all its complete series
together: rules pick the models for each series (:mod:`node.rules`); a model that does
not take a series (its ``accepts``) gets a skipped job with the reason; when several
series of the study go to the same volume model, the one that fits best (ORIGINAL,
axial, thinnest slices, most instances) runs and the others are recorded as skipped,
naming the series chosen. A model that reads images one by one (``input_kind`` image,
e.g. a radiograph classifier) runs on every series it takes: each view is its own. Only headers are read (never pixel data), from the spool.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from models.base import InputKindValues, OrientationValues, orientation_of
from models.registry import get_model_class
from node.config import Rule
from node.rules import route_series
from node.state import PlannedJob, SeriesPlan, SeriesStateValues, StateDB

__all__ = ["SeriesCandidate", "plan_study", "route_complete_studies"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesCandidate:
    """A complete series as routing sees it: one header and how many instances."""

    series_instance_uid: str
    header: Dataset | None
    instance_count: int
    unreadable_reason: str | None = None

    @property
    def orientation(self) -> OrientationValues | None:
        if self.header is None or "ImageOrientationPatient" not in self.header:
            return None
        try:
            return orientation_of([float(v) for v in self.header.ImageOrientationPatient])
        except (TypeError, ValueError):
            return None

    def fitness(self) -> tuple[bool, bool, float, int]:
        """Larger is better: ORIGINAL, axial, thinner slices, more instances."""
        header = self.header if self.header is not None else Dataset()
        image_type = [str(v).upper() for v in header.get("ImageType", [])]
        try:
            thickness = float(header.get("SliceThickness", "inf"))
        except (TypeError, ValueError):
            thickness = float("inf")
        return (
            "ORIGINAL" in image_type,
            self.orientation == OrientationValues.AXIAL,
            -thickness,
            self.instance_count,
        )


def _skip_reason(model: str, candidate: SeriesCandidate) -> str | None:
    """Why ``model`` does not take this series (from its ``accepts``), or None."""
    header = candidate.header if candidate.header is not None else Dataset()
    return get_model_class(model).accepts.reject_reason(
        modality=str(header.get("Modality", "")),
        orientation=candidate.orientation,
        slices=candidate.instance_count,
    )


def plan_study(candidates: list[SeriesCandidate], rules: list[Rule]) -> dict[str, SeriesPlan]:
    """Decide, for each series of one study, its jobs or why it is ignored."""
    plans: dict[str, SeriesPlan] = {}
    runnable: dict[str, list[SeriesCandidate]] = defaultdict(list)
    for candidate in candidates:
        uid = candidate.series_instance_uid
        if candidate.header is None:
            plans[uid] = SeriesPlan([], candidate.unreadable_reason)
            continue
        routed = route_series(rules, candidate.header, candidate.instance_count)
        if not routed:
            plans[uid] = SeriesPlan([], "no rule matches")
            continue
        jobs = []
        for choice in routed:
            reason = _skip_reason(choice.model, candidate)
            jobs.append(
                PlannedJob(choice.model, ",".join(choice.rules), choice.destinations, reason)
            )
            if reason is None:
                runnable[choice.model].append(candidate)
        plans[uid] = SeriesPlan(jobs, None)
    for model, fitting in runnable.items():
        if get_model_class(model).input_kind == InputKindValues.IMAGE:
            continue
        best = max(fitting, key=SeriesCandidate.fitness)
        for other in fitting:
            if other is best:
                continue
            reason = f"series {best.series_instance_uid} of the same study fits the model better"
            plans[other.series_instance_uid] = SeriesPlan(
                [
                    job._replace(skipped_reason=reason) if job.model == model else job
                    for job in plans[other.series_instance_uid].jobs
                ],
                None,
            )
    return plans


def _candidate(db: StateDB, series_instance_uid: str) -> SeriesCandidate:
    paths = db.instance_paths(series_instance_uid)
    if not paths:
        return SeriesCandidate(series_instance_uid, None, 0, "no instances on disk")
    try:
        header = dcmread(paths[0], stop_before_pixels=True)
    except (OSError, InvalidDicomError, EOFError, ValueError) as exc:
        reason = f"cannot read the header of {paths[0].name}: {exc}"
        return SeriesCandidate(series_instance_uid, None, len(paths), reason)
    return SeriesCandidate(series_instance_uid, header, len(paths))


def route_complete_studies(db: StateDB, rules: list[Rule]) -> list[int]:
    """Route every study whose series are all complete; returns the ids of jobs to run."""
    still_receiving = {
        s.study_instance_uid for s in db.series_in_state(SeriesStateValues.RECEIVING)
    }
    studies: dict[str, list[str]] = defaultdict(list)
    for series in db.series_in_state(SeriesStateValues.COMPLETE):
        if series.study_instance_uid not in still_receiving:
            studies[series.study_instance_uid].append(series.series_instance_uid)
    created: list[int] = []
    for study_uid, series_uids in studies.items():
        plans = plan_study([_candidate(db, uid) for uid in series_uids], rules)
        for uid, plan in plans.items():
            if plan.ignored_reason is not None:
                logger.info("series %s ignored: %s", uid, plan.ignored_reason)
            for job in plan.jobs:
                if job.skipped_reason is not None:
                    logger.info("series %s skipped by %s: %s", uid, job.model, job.skipped_reason)
                else:
                    logger.info("series %s goes to %s", uid, job.model)
        created.extend(db.route_study(plans))
        logger.info("study %s routed", study_uid)
    return created

"""Routing: complete studies -> jobs, by the rules and by what each model accepts.

A study is routed once none of its series is still receiving, all its complete series
together: rules pick the models for each series (:mod:`node.rules`); a model that does
not take a series (its ``accepts``) gets a skipped job with the reason; when several
series of the study go to the same volume model, the one that fits best (ORIGINAL,
axial, thinnest slices, most instances) runs and the others are recorded as skipped,
naming the series chosen. A model that reads images one by one (``input_kind`` image,
e.g. a radiograph classifier) runs on every series it takes: each view is its own. Only
headers are read (never pixel data), from the spool.

With ``completion.late: rerun`` a study is routed again, as a whole, whenever late data
completes; the state DB turns each job whose input changed into a new version of its
lineage (:func:`lineage`). Before a volume model runs on new input the stack is checked
for missing slices (:func:`node.completeness.missing_slices`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from models.base import InputKindValues, Model, OrientationValues, orientation_of
from models.registry import get_model_class
from node.completeness import decode_geometry, geometry_of, missing_slices
from node.config import Rule
from node.rules import input_conditions, route_series, series_matches
from node.state import PlannedJob, SeriesPlan, SeriesStateValues, StateDB

__all__ = [
    "SeriesCandidate",
    "candidate_from_paths",
    "lineage",
    "plan_study",
    "route_complete_studies",
]

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


def _per_image(model: str) -> bool:
    """Whether ``model`` reads images one by one (False for a model not available)."""
    try:
        return get_model_class(model).input_kind == InputKindValues.IMAGE
    except KeyError:
        return False


def _skip_reason(model: str, candidate: SeriesCandidate) -> str | None:
    """Why ``model`` does not take this series (from its ``accepts``, or because it is
    not available here, e.g. its folder was removed), or None."""
    header = candidate.header if candidate.header is not None else Dataset()
    try:
        cls = get_model_class(model)
    except KeyError as exc:
        return f"model {model} is not available: {exc.args[0]}"
    return cls.accepts.reject_reason(
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
                PlannedJob(
                    choice.model,
                    ",".join(choice.rules),
                    choice.destinations,
                    reason,
                    shadow=choice.shadow,
                )
            )
            if reason is None:
                runnable[choice.model].append(candidate)
        plans[uid] = SeriesPlan(jobs, None)
    for model, fitting in runnable.items():
        if _per_image(model):
            continue
        cls = get_model_class(model)
        if cls.inputs:
            _assign_inputs(cls, fitting, plans)
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


def _assign_inputs(
    cls: type[Model], fitting: list[SeriesCandidate], plans: dict[str, SeriesPlan]
) -> None:
    """Give each input of a multi-series model the best-fitting series of the study that
    matches it (a series serves one input). The job runs on the reference input's series
    and names the others; every other series the rules sent to the model is skipped,
    saying which input it serves or why it serves none. An input without a series skips
    them all, naming it."""
    model, inputs = cls.name, cls.inputs
    conditions = input_conditions(inputs)
    assigned: dict[str, SeriesCandidate] = {}
    for name, match in conditions.items():
        matching = [
            c
            for c in fitting
            if c not in assigned.values()
            and c.header is not None
            and series_matches(match, c.header)
        ]
        if matching:
            assigned[name] = max(matching, key=SeriesCandidate.fitness)
    missing = [name for name in inputs if name not in assigned]
    reference = assigned.get(str(cls.reference_input))
    served = {c.series_instance_uid: name for name, c in assigned.items()}
    for candidate in fitting:
        uid = candidate.series_instance_uid
        if missing or reference is None:
            reason = (
                f"{model} needs a series for input(s) {', '.join(missing)}, and none of the "
                "study's series matches"
            )
        elif candidate is reference:
            reason = None
        elif uid in served:
            reason = (
                f"input {served[uid]!r} of {model}, which runs on series "
                f"{reference.series_instance_uid} (input {cls.reference_input!r})"
            )
        else:
            reason = f"matches no input of {model}, or another series fits that input better"
        jobs = []
        for job in plans[uid].jobs:
            if job.model != model:
                jobs.append(job)
            elif reason is not None:
                jobs.append(job._replace(skipped_reason=reason))
            else:
                jobs.append(
                    job._replace(
                        reference_input=cls.reference_input,
                        other_inputs=tuple(
                            (name, c.series_instance_uid)
                            for name, c in assigned.items()
                            if c is not reference
                        ),
                    )
                )
        plans[uid] = SeriesPlan(jobs, None)


def candidate_from_paths(series_instance_uid: str, paths: Sequence[Path]) -> SeriesCandidate:
    """A series as routing sees it: the header of ``paths[0]`` (pixel data not read) and
    ``len(paths)`` instances; without a readable header, the reason instead."""
    if not paths:
        return SeriesCandidate(series_instance_uid, None, 0, "no instances on disk")
    try:
        header = dcmread(paths[0], stop_before_pixels=True)
    except (OSError, InvalidDicomError, EOFError, ValueError) as exc:
        reason = f"cannot read the header of {paths[0].name}: {exc}"
        return SeriesCandidate(series_instance_uid, None, len(paths), reason)
    return SeriesCandidate(series_instance_uid, header, len(paths))


def _candidate(db: StateDB, series_instance_uid: str) -> SeriesCandidate:
    return candidate_from_paths(series_instance_uid, db.instance_paths(series_instance_uid))


def lineage(
    study_instance_uid: str, model: str, series_instance_uid: str, *, per_study: bool
) -> str:
    """The line of versions a job belongs to: per study for a volume model when late
    data re-routes studies (a better series arriving later replaces the first run),
    else per series."""
    if per_study:
        return f"{study_instance_uid}/{model}"
    return f"{study_instance_uid}/{model}/{series_instance_uid}"


_GEOMETRY_TAGS = ["ImagePositionPatient", "ImageOrientationPatient", "NumberOfFrames"]


def _recorded_geometry(path: Path, geometry: str | None) -> str | None:
    """An instance's geometry as recorded on receipt, or read from its file when the
    DB has none (recorded before schema 4); None when the file is unreadable."""
    if geometry is not None:
        return geometry
    try:
        return geometry_of(dcmread(path, stop_before_pixels=True, specific_tags=_GEOMETRY_TAGS))
    except (OSError, InvalidDicomError, EOFError, ValueError):
        return None  # the worker names an unreadable file


def _gap_reason(db: StateDB, series_instance_uid: str) -> str | None:
    """Why the series' stack has a hole (naming each missing position), or None.

    Multi-frame instances and images without patient geometry are not judged.
    """
    positions = []
    orientation: list[float] | None = None
    for path, recorded in db.instance_geometries(series_instance_uid):
        geometry = _recorded_geometry(path, recorded)
        decoded = None if geometry is None else decode_geometry(geometry)
        if decoded is None:
            return None
        positions.append(decoded[0])
        orientation = decoded[1]
    if orientation is None:
        return None
    missing = missing_slices(positions, orientation)
    if not missing:
        return None
    where = "; ".join(f"({x:.2f}, {y:.2f}, {z:.2f})" for x, y, z in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return (
        f"{len(missing)} slice(s) missing from series {series_instance_uid}: none at "
        f"ImagePositionPatient {where}{more} mm"
    )


def _check_gaps(db: StateDB, plans: dict[str, SeriesPlan]) -> dict[str, SeriesPlan] | None:
    """Apply the slice-gap check to the series about to run a volume model on new input.

    A complete series with a hole waits one more quiet period (returns None: the study
    is not routed now); after that wait, or when it was routed before, its new jobs are
    created failed, with the reason.
    """
    checked = dict(plans)
    for uid, plan in plans.items():
        fresh = [
            job
            for job in plan.jobs
            if job.skipped_reason is None
            and not _per_image(job.model)
            and not _unchanged(db, uid, job)
        ]
        if not fresh:
            continue
        reason = _gap_reason(db, uid)
        if reason is None:
            continue
        record = db.series(uid)
        if (
            record is not None
            and record.gap_waits == 0
            and db.wait_another_quiet_period(uid, reason)
        ):
            logger.warning("%s; waiting one more quiet period", reason)
            return None
        checked[uid] = plan._replace(
            jobs=[job._replace(failed_reason=reason) if job in fresh else job for job in plan.jobs]
        )
    return checked


def _unchanged(db: StateDB, series_instance_uid: str, job: PlannedJob) -> bool:
    """Whether the lineage's latest job already ran on exactly this series' input."""
    latest = db.latest_version(job.lineage)
    if latest is None or latest.series_instance_uid != series_instance_uid:
        return False
    manifest = db.manifest(series_instance_uid)
    return (
        manifest is not None
        and latest.manifest is not None
        and (latest.manifest.digest == manifest.digest)
    )


def route_complete_studies(
    db: StateDB,
    rules: list[Rule],
    *,
    rerun_late: bool = True,
    on_routed: Callable[[str], object] | None = None,
) -> list[int]:
    """Route every study none of whose series is still receiving and one of whose series
    completed; returns the ids of jobs to run. ``on_routed`` hears each study routed.

    With ``rerun_late`` the whole study is planned again, every series it has (the best
    series for a model is chosen over all of them) and the state DB creates a new
    version of each job whose input changed; otherwise only the newly complete series
    are planned, on their own.
    """
    still_receiving = {
        s.study_instance_uid for s in db.series_in_state(SeriesStateValues.RECEIVING)
    }
    arrived: dict[str, float] = {}
    for complete in db.series_in_state(SeriesStateValues.COMPLETE):
        study = complete.study_instance_uid
        arrived[study] = min(arrived.get(study, complete.first_received), complete.first_received)
    ready = set(arrived) - still_receiving
    created: list[int] = []
    # First come, first served: studies completing together (a batch released at once)
    # are queued in the order they began to arrive.
    for study_uid in sorted(ready, key=lambda uid: (arrived[uid], uid)):
        series = [
            s
            for s in db.series_of_study(study_uid)
            if s.state == SeriesStateValues.COMPLETE
            or (rerun_late and s.state != SeriesStateValues.RECEIVING)
        ]
        plans = plan_study([_candidate(db, s.series_instance_uid) for s in series], rules)
        plans = {
            uid: plan._replace(
                jobs=[
                    job._replace(
                        lineage=lineage(
                            study_uid,
                            job.model,
                            uid,
                            per_study=rerun_late and not _per_image(job.model),
                        )
                    )
                    for job in plan.jobs
                ]
            )
            for uid, plan in plans.items()
        }
        checked = _check_gaps(db, plans)
        if checked is None:
            continue
        for uid, plan in checked.items():
            if plan.ignored_reason is not None:
                logger.info("series %s ignored: %s", uid, plan.ignored_reason)
            for job in plan.jobs:
                if job.skipped_reason is not None:
                    logger.info("series %s skipped by %s: %s", uid, job.model, job.skipped_reason)
                elif job.failed_reason is not None:
                    logger.warning(
                        "series %s cannot go to %s: %s", uid, job.model, job.failed_reason
                    )
        ids = db.route_study(checked)
        for job_id in ids:
            created_job = db.job(job_id)
            if created_job is not None:
                replaces = created_job.predecessor_id
                logger.info(
                    "series %s goes to %s (job %d%s)",
                    created_job.series_instance_uid,
                    created_job.model,
                    created_job.id,
                    f", a new version after job {replaces}" if replaces else "",
                )
        created.extend(ids)
        logger.info("study %s routed", study_uid)
        if on_routed is not None:
            on_routed(study_uid)
    return created

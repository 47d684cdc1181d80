"""``pacsnode rules test``: what the rules would do with a study, changing nothing.

For each series it says which rules match, for each rule that does not the first
condition that failed with the value seen, and which models would run or why they would
be skipped. Matching is :func:`node.rules.condition_matches` itself (this module only puts
a failure into words), and the models come from :func:`node.routing.plan_study`, so the
dry run decides exactly as routing does.

Series come from the state DB (received studies; only read) or from DICOM files on disk,
grouped by Study Instance UID and then Series Instance UID. As in routing, a series is
seen through the header of its first instance (by path) and its number of instances.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from node.config import MatchCondition, Rule
from node.routing import SeriesCandidate, candidate_from_paths, plan_study
from node.rules import attribute_values, condition_matches
from node.state import SeriesPlan, StateDB

__all__ = [
    "RuleVerdict",
    "SeriesReport",
    "StudyInput",
    "StudyReport",
    "build_report",
    "explain_condition",
    "explain_rule",
    "format_report",
    "parse_duration",
    "studies_from_db",
    "studies_from_files",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_READ_ERRORS = (OSError, InvalidDicomError, EOFError, ValueError)


@dataclass(frozen=True)
class StudyInput:
    """One study to check: its series as routing would see them."""

    study_instance_uid: str
    candidates: tuple[SeriesCandidate, ...]


@dataclass(frozen=True)
class RuleVerdict:
    """One rule against one series: ``failure`` is None when the rule matches."""

    rule: str
    failure: str | None


@dataclass(frozen=True)
class SeriesReport:
    """A series, each rule's verdict on it and routing's plan for it."""

    candidate: SeriesCandidate
    verdicts: tuple[RuleVerdict, ...]
    plan: SeriesPlan


@dataclass(frozen=True)
class StudyReport:
    """What the rules would do with every series of one study."""

    study_instance_uid: str
    patient_id: str | None
    series: tuple[SeriesReport, ...]


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``90s``, ``30m``, ``2h``, ``1d`` or ``1w``.

    Raises
    ------
    ValueError
        If ``text`` is not a number followed by one of the units s, m, h, d, w.
    """
    found = _DURATION.match(text)
    if found is None:
        raise ValueError(
            f"{text!r} is not a duration; give a number and a unit s, m, h, d or w (e.g. 2h)"
        )
    return float(found.group(1)) * _UNIT_SECONDS[found.group(2)]


def _quoted(text: str) -> str:
    return f"'{text}'"


def _number(value: float) -> str:
    return f"{value:g}"


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _condition_failure(condition: MatchCondition, values: list[str]) -> str:
    """Why present ``values`` fail ``condition`` (known to fail), in words."""
    joined = "\\".join(values)
    if condition.equals is not None:
        expected = condition.equals
        shown = _number(expected) if isinstance(expected, float | int) else _quoted(expected)
        return f"expected {shown}, found {_quoted(joined)}"
    if condition.regex is not None:
        return f'{{regex: "{condition.regex}"}} did not match {_quoted(joined)}'
    if condition.contains is not None:
        if len(values) > 1:
            return f"{_quoted(condition.contains)} is not one of {_quoted(joined)}"
        return f"{_quoted(condition.contains)} does not occur in {_quoted(joined)}"
    if len(values) > 1:
        return f"expected one number, found {_quoted(joined)}"
    number = _as_float(values[0])
    if number is None:
        return f"expected a number, found {_quoted(joined)}"
    if condition.min is not None and number < condition.min:
        return f"found {_quoted(joined)}, below the minimum {_number(condition.min)}"
    if condition.max is not None and number > condition.max:
        return f"found {_quoted(joined)}, above the maximum {_number(condition.max)}"
    return f"did not match {_quoted(joined)}"  # not reached while condition_matches agrees


def explain_condition(keyword: str, condition: MatchCondition, header: Dataset) -> str | None:
    """Why ``header`` fails one condition of a rule, or None when it passes.

    Parameters
    ----------
    keyword
        The DICOM keyword the condition tests.
    condition
        The condition, as in the rule's ``match``.
    header
        One instance's header.

    Returns
    -------
    str or None
        ``"<keyword>: <reason with the value seen>"``, e.g.
        ``"Modality: expected 'MR', found 'CT'"`` or ``"Modality: attribute missing"``;
        None if :func:`node.rules.condition_matches` accepts the value.
    """
    values = attribute_values(header, keyword)
    if condition_matches(condition, values):
        return None
    if values is None:
        return f"{keyword}: attribute {'empty' if keyword in header else 'missing'}"
    return f"{keyword}: {_condition_failure(condition, values)}"


def explain_rule(rule: Rule, header: Dataset, instance_count: int) -> str | None:
    """The first condition of ``rule`` the series fails, in the order
    :func:`node.rules.rule_matches` checks them (``min_instances``, then ``match`` in
    config order); None when the rule matches.

    Parameters
    ----------
    rule
        A configured rule.
    header
        The header of the series' first instance.
    instance_count
        How many instances the series has.
    """
    if instance_count < rule.min_instances:
        return f"min_instances: needs {rule.min_instances}, the series has {instance_count}"
    for keyword, condition in rule.match.items():
        failure = explain_condition(keyword, condition, header)
        if failure is not None:
            return failure
    return None


def build_report(study: StudyInput, rules: Sequence[Rule]) -> StudyReport:
    """Each rule's verdict on each series of ``study`` and routing's plan for them
    (:func:`node.routing.plan_study`: models, skips by ``accepts``, best series)."""
    candidates = list(study.candidates)
    plans = plan_study(candidates, list(rules))
    series: list[SeriesReport] = []
    patient_id: str | None = None
    for candidate in candidates:
        verdicts: tuple[RuleVerdict, ...] = ()
        if candidate.header is not None:
            if patient_id is None:
                found = attribute_values(candidate.header, "PatientID")
                patient_id = "\\".join(found) if found else None
            verdicts = tuple(
                RuleVerdict(
                    rule.name, explain_rule(rule, candidate.header, candidate.instance_count)
                )
                for rule in rules
            )
        series.append(SeriesReport(candidate, verdicts, plans[candidate.series_instance_uid]))
    return StudyReport(study.study_instance_uid, patient_id, tuple(series))


def _attribute_text(header: Dataset | None, keyword: str) -> str | None:
    values = attribute_values(header, keyword) if header is not None else None
    return "\\".join(values) if values else None


def _series_lines(report: SeriesReport) -> list[str]:
    candidate = report.candidate
    count = candidate.instance_count
    modality = _attribute_text(candidate.header, "Modality") or "?"
    description = _attribute_text(candidate.header, "SeriesDescription") or ""
    instances = f"{count} instance{'' if count == 1 else 's'}"
    lines = [f'  series {candidate.series_instance_uid}  {modality}  "{description}"  {instances}']
    for verdict in report.verdicts:
        outcome = "matches" if verdict.failure is None else f"no — {verdict.failure}"
        lines.append(f"    rule {verdict.rule}: {outcome}")
    for job in report.plan.jobs:
        if job.skipped_reason is not None:
            lines.append(f"    model {job.model}: skipped — {job.skipped_reason}")
            continue
        if job.shadow:
            send_to = "shadow mode: results kept, nothing sent"
        elif job.destinations:
            send_to = f"send to {', '.join(job.destinations)}"
        else:
            send_to = "no destination"
        lines.append(
            f"    model {job.model}: would run (rules {job.rule.replace(',', ', ')}; {send_to})"
        )
    if report.plan.ignored_reason is not None:
        lines.append(f"    ignored: {report.plan.ignored_reason}")
    return lines


def format_report(report: StudyReport) -> list[str]:
    """The report as lines of text (no newlines), one study header line first."""
    patient = report.patient_id or "?"
    lines = [
        f"study {report.study_instance_uid} (PatientID {patient}, {len(report.series)} series)"
    ]
    for series in report.series:
        lines.extend(_series_lines(series))
    return lines


def studies_from_db(db: StateDB, study_uids: Iterable[str]) -> list[StudyInput]:
    """The received series of each study, in the order received, using only the state
    DB's query methods; studies the DB does not know are left out."""
    studies: list[StudyInput] = []
    for study_uid in study_uids:
        records = db.series_of_study(study_uid)
        if not records:
            continue
        candidates = tuple(
            candidate_from_paths(r.series_instance_uid, db.instance_paths(r.series_instance_uid))
            for r in records
        )
        studies.append(StudyInput(study_uid, candidates))
    return studies


def _files_under(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            found.append(path)
    return found


def studies_from_files(paths: Iterable[Path]) -> tuple[list[StudyInput], int]:
    """DICOM files (``paths`` are files or folders, searched recursively) grouped by
    study and series, in the order first found; a series' header is its first file's.

    Returns
    -------
    tuple
        The studies, and how many files were passed over: not DICOM, or without a Study
        or Series Instance UID (a DICOMDIR, for instance).
    """
    series_files: dict[tuple[str, str], tuple[Dataset, set[str]]] = {}
    passed_over = 0
    for path in _files_under(paths):
        try:
            header = dcmread(path, stop_before_pixels=True)
        except _READ_ERRORS:
            passed_over += 1
            continue
        study = _attribute_text(header, "StudyInstanceUID")
        series = _attribute_text(header, "SeriesInstanceUID")
        if study is None or series is None:
            passed_over += 1
            continue
        # The node keeps one instance per SOP Instance UID; so does the count here.
        sop = _attribute_text(header, "SOPInstanceUID") or str(path)
        series_files.setdefault((study, series), (header, set()))[1].add(sop)
    by_study: dict[str, list[SeriesCandidate]] = {}
    for (study, series), (first, instances) in series_files.items():
        candidate = SeriesCandidate(series, first, len(instances))
        by_study.setdefault(study, []).append(candidate)
    studies = [StudyInput(uid, tuple(candidates)) for uid, candidates in by_study.items()]
    return studies, passed_over

"""Read pacsnode's measurement numbers back out of an SR content tree (tests only).

Plain pydicom walking, independent of highdicom's parsing, so the tests check what a
PACS would find in the file: each TID 1411 measurement group (DCM 125007 "Measurement
Group") is named by its Tracking Identifier (DCM 112039) and holds NUM items.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydicom import Dataset

__all__ = [
    "iter_measurement_groups",
    "read_absent",
    "read_findings",
    "read_means",
    "read_num",
    "read_referenced_segments",
    "read_stds",
    "read_volumes_ml",
]

_MEASUREMENT_GROUP = ("125007", "DCM")
_TRACKING_IDENTIFIER = ("112039", "DCM")
_REFERENCED_SEGMENT = ("121191", "DCM")
_VOLUME = ("118565006", "SCT")
_ATTENUATION = ("112031", "DCM")
_MEAN = ("373098007", "SCT")
_STD = ("386136009", "SCT")
_DERIVATION = ("121401", "DCM")
_PROBABILITY = ("122157", "DCM")
_FINDING = ("121071", "DCM")
_PRESENT_ABSENT = {("52101004", "SCT"): "present", ("272519000", "SCT"): "absent"}


def _concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return (str(code.CodeValue), str(code.CodingSchemeDesignator))


def _walk(items: list[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _walk(list(item.get("ContentSequence", [])))


def iter_measurement_groups(sr: Dataset) -> Iterator[tuple[str, Dataset]]:
    """(tracking identifier, group container) for every measurement group in ``sr``."""
    for item in _walk(list(sr.ContentSequence)):
        if item.ValueType != "CONTAINER" or _concept(item) != _MEASUREMENT_GROUP:
            continue
        names = [
            str(child.TextValue)
            for child in item.ContentSequence
            if child.ValueType == "TEXT" and _concept(child) == _TRACKING_IDENTIFIER
        ]
        if len(names) != 1:
            raise AssertionError(f"measurement group has {len(names)} tracking identifiers")
        yield names[0], item


def _derivation(item: Dataset) -> tuple[str, str] | None:
    for child in item.get("ContentSequence", []):
        if child.ValueType == "CODE" and _concept(child) == _DERIVATION:
            code = child.ConceptCodeSequence[0]
            return (str(code.CodeValue), str(code.CodingSchemeDesignator))
    return None


def read_num(
    group: Dataset, concepts: set[tuple[str, str]], derivation: tuple[str, str] | None = None
) -> tuple[float, str]:
    """(value, UCUM unit code) of the one NUM child of ``group`` named by ``concepts``
    (and, when given, with that derivation modifier)."""
    found = [
        child
        for child in group.ContentSequence
        if child.ValueType == "NUM"
        and _concept(child) in concepts
        and (derivation is None or _derivation(child) == derivation)
    ]
    if len(found) != 1:
        raise AssertionError(f"expected one NUM of {concepts}, found {len(found)}")
    measured = found[0].MeasuredValueSequence[0]
    unit = str(measured.MeasurementUnitsCodeSequence[0].CodeValue)
    return float(measured.NumericValue), unit


def read_volumes_ml(sr: Dataset) -> dict[str, float]:
    """Segment name (tracking identifier) -> volume in mL, from every measurement group.

    Raises
    ------
    AssertionError
        If a volume is missing or not in mL.
    """
    volumes = {}
    for name, group in iter_measurement_groups(sr):
        if not _has_numbers(group):
            continue  # a label the model did not find (qualitative "Absent" only)
        value, unit = read_num(group, {_VOLUME})
        if unit not in {"mL", "ml"}:
            raise AssertionError(f"volume of {name!r} has unit {unit!r}, not mL")
        volumes[name] = value
    return volumes


def _has_numbers(group: Dataset) -> bool:
    return any(child.ValueType == "NUM" for child in group.ContentSequence)


def _statistic(group: Dataset, statistic: tuple[str, str]) -> tuple[float, str]:
    """CT: attenuation coefficient with the statistic as derivation; else named by it."""
    try:
        return read_num(group, {_ATTENUATION}, derivation=statistic)
    except AssertionError:
        return read_num(group, {statistic})


def read_means(sr: Dataset) -> dict[str, tuple[float, str]]:
    """Segment name -> (mean value, UCUM unit code) from every measurement group."""
    return {
        name: _statistic(group, _MEAN)
        for name, group in iter_measurement_groups(sr)
        if _has_numbers(group)
    }


def read_stds(sr: Dataset) -> dict[str, tuple[float, str]]:
    """Segment name -> (standard deviation, UCUM unit code) from every measurement group."""
    return {
        name: _statistic(group, _STD)
        for name, group in iter_measurement_groups(sr)
        if _has_numbers(group)
    }


def read_absent(sr: Dataset) -> set[str]:
    """Names of the groups that say their finding is Absent and hold no numbers."""
    absent = set()
    for name, group in iter_measurement_groups(sr):
        values = [
            (
                str(c.ConceptCodeSequence[0].CodeValue),
                str(c.ConceptCodeSequence[0].CodingSchemeDesignator),
            )
            for c in group.ContentSequence
            if c.ValueType == "CODE" and "ConceptCodeSequence" in c
        ]
        if not _has_numbers(group) and ("272519000", "SCT") in values:
            absent.add(name)
    return absent


def read_referenced_segments(sr: Dataset) -> dict[str, tuple[str, int]]:
    """Segment name -> (referenced SEG SOP instance UID, segment number)."""
    refs = {}
    for name, group in iter_measurement_groups(sr):
        if not _has_numbers(group):
            continue
        images = [
            child
            for child in group.ContentSequence
            if child.ValueType == "IMAGE" and _concept(child) == _REFERENCED_SEGMENT
        ]
        if len(images) != 1:
            raise AssertionError(f"group {name!r} references {len(images)} segments")
        sop = images[0].ReferencedSOPSequence[0]
        refs[name] = (str(sop.ReferencedSOPInstanceUID), int(sop.ReferencedSegmentNumber))
    return refs


def read_findings(sr: Dataset) -> dict[str, tuple[str, float, str]]:
    """Group name -> (finding code value, probability, "present"/"absent") of every
    classification group: its Finding (DCM 121071), its Probability (DCM 122157, unit
    "1") and the qualitative evaluation named by the finding."""
    findings = {}
    for name, group in iter_measurement_groups(sr):
        coded = [child for child in group.ContentSequence if child.ValueType == "CODE"]
        finding = next(c.ConceptCodeSequence[0] for c in coded if _concept(c) == _FINDING)
        key = (str(finding.CodeValue), str(finding.CodingSchemeDesignator))
        (evaluation,) = [c for c in coded if _concept(c) == key]
        value = evaluation.ConceptCodeSequence[0]
        verdict = _PRESENT_ABSENT[(str(value.CodeValue), str(value.CodingSchemeDesignator))]
        probability, unit = read_num(group, {_PROBABILITY})
        if unit != "1":
            raise AssertionError(f"probability of {name!r} has unit {unit!r}, not 1")
        findings[name] = (key[0], probability, verdict)
    return findings

"""``pacsnode rules test``'s pure part: each failing condition in words with the value
seen, the first failure of a rule, and the report over a study's series."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, FileMetaDataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian

from node.config import MatchCondition, Rule
from node.routing import SeriesCandidate, candidate_from_paths
from node.rules import rule_matches
from node.rules_check import (
    StudyInput,
    build_report,
    explain_condition,
    explain_rule,
    format_report,
    parse_duration,
    studies_from_files,
)
from tests.dicom_factory import header, write_ct_series

CT = header(
    Modality="CT",
    ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
    SeriesDescription="HEAD 5mm",
    SliceThickness="5",
    BodyPartExamined="",
    PatientID="P1",
)


def _rule(name: str, match: dict[str, Any], models: list[str], **extra: Any) -> Rule:
    return Rule.model_validate({"name": name, "match": match, "models": models, **extra})


@pytest.mark.parametrize(
    ("keyword", "condition", "expected"),
    [
        ("Modality", "CT", None),
        ("Modality", "MR", "Modality: expected 'MR', found 'CT'"),
        ("SliceThickness", 5, None),
        ("SliceThickness", 1.0, "SliceThickness: expected 1, found '5'"),
        ("SeriesDescription", {"regex": "(?i)head"}, None),
        (
            "SeriesDescription",
            {"regex": "(?i)chest"},
            "SeriesDescription: {regex: \"(?i)chest\"} did not match 'HEAD 5mm'",
        ),
        ("ImageType", {"contains": "AXIAL"}, None),
        (
            "ImageType",
            {"contains": "LOCALIZER"},
            "ImageType: 'LOCALIZER' is not one of 'ORIGINAL\\PRIMARY\\AXIAL'",
        ),
        ("SeriesDescription", {"contains": "5mm"}, None),
        (
            "SeriesDescription",
            {"contains": "1mm"},
            "SeriesDescription: '1mm' does not occur in 'HEAD 5mm'",
        ),
        ("SliceThickness", {"min": 0.5, "max": 5}, None),
        (
            "SliceThickness",
            {"min": 0.5, "max": 3},
            "SliceThickness: found '5', above the maximum 3",
        ),
        ("SliceThickness", {"min": 6.5}, "SliceThickness: found '5', below the minimum 6.5"),
        ("SeriesDescription", {"min": 1}, "SeriesDescription: expected a number, found 'HEAD 5mm'"),
        (
            "ImageType",
            {"max": 1},
            "ImageType: expected one number, found 'ORIGINAL\\PRIMARY\\AXIAL'",
        ),
        ("BodyPartExamined", "CHEST", "BodyPartExamined: attribute empty"),
        ("ProtocolName", {"regex": "."}, "ProtocolName: attribute missing"),
    ],
)
def test_explain_condition(keyword: str, condition: Any, expected: str | None) -> None:
    assert explain_condition(keyword, MatchCondition.model_validate(condition), CT) == expected


def test_explain_rule_reports_min_instances_first_then_conditions_in_order() -> None:
    rule = _rule(
        "ct-chest",
        {
            "Modality": "CT",
            "SeriesDescription": {"regex": "(?i)chest"},
            "SliceThickness": {"max": 3},
            "min_instances": 20,
        },
        ["ct-tissue"],
    )
    assert explain_rule(rule, CT, 12) == "min_instances: needs 20, the series has 12"
    # Both later conditions fail; the first in config order is the one named.
    assert explain_rule(rule, CT, 20) == (
        "SeriesDescription: {regex: \"(?i)chest\"} did not match 'HEAD 5mm'"
    )
    assert explain_rule(_rule("any-ct", {"Modality": "CT"}, ["ct-tissue"]), CT, 1) is None


@pytest.mark.parametrize(
    "match",
    [
        {},
        {"Modality": "CT"},
        {"Modality": "MR"},
        {"ImageType": {"contains": "AXIAL"}, "SliceThickness": {"min": 2, "max": 6}},
        {"ImageType": {"contains": "AXIAL"}, "SliceThickness": {"max": 2}},
        {"ProtocolName": "x"},
        {"min_instances": 10},
    ],
)
def test_explain_rule_agrees_with_rule_matches(match: dict[str, Any]) -> None:
    rule = _rule("r", match, ["ct-tissue"])
    for count in (1, 10):
        assert (explain_rule(rule, CT, count) is None) is rule_matches(rule, CT, count)


RULES = [
    _rule(
        "ct-tissue",
        {"Modality": "CT", "ImageType": {"contains": "AXIAL"}, "min_instances": 10},
        ["ct-tissue"],
        send_to=["pacs", "archive"],
    ),
    _rule("mr-brain", {"Modality": "MR"}, ["mr-brain-mask"]),
]


def _ct(description: str, image_type: list[str], thickness: str) -> Dataset:
    return header(
        Modality="CT",
        ImageType=image_type,
        SeriesDescription=description,
        SliceThickness=thickness,
        ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
        PatientID="PHANTOM1",
    )


def test_report_lines_for_a_study() -> None:
    study = StudyInput(
        "1.2.3",
        (
            SeriesCandidate("1.2.3.4", _ct("Chest", ["ORIGINAL", "PRIMARY", "AXIAL"], "5"), 24),
            SeriesCandidate("1.2.3.5", _ct("Recon", ["DERIVED", "SECONDARY", "AXIAL"], "1"), 24),
            SeriesCandidate("1.2.3.6", _ct("Scout", ["ORIGINAL", "PRIMARY", "LOCALIZER"], "5"), 2),
            SeriesCandidate("1.2.3.7", None, 3, "cannot read the header of x.dcm: broken"),
        ),
    )
    lines = format_report(build_report(study, RULES))
    assert lines == [
        "study 1.2.3 (PatientID PHANTOM1, 4 series)",
        '  series 1.2.3.4  CT  "Chest"  24 instances',
        "    rule ct-tissue: matches",
        "    rule mr-brain: no — Modality: expected 'MR', found 'CT'",
        "    model ct-tissue: would run (rules ct-tissue; send to pacs, archive)",
        '  series 1.2.3.5  CT  "Recon"  24 instances',
        "    rule ct-tissue: matches",
        "    rule mr-brain: no — Modality: expected 'MR', found 'CT'",
        "    model ct-tissue: skipped — series 1.2.3.4 of the same study fits the model better",
        '  series 1.2.3.6  CT  "Scout"  2 instances',
        "    rule ct-tissue: no — min_instances: needs 10, the series has 2",
        "    rule mr-brain: no — Modality: expected 'MR', found 'CT'",
        "    ignored: no rule matches",
        '  series 1.2.3.7  ?  ""  3 instances',
        "    ignored: cannot read the header of x.dcm: broken",
    ]


def test_report_skip_by_accepts_and_merged_rules() -> None:
    rules = [
        *RULES,
        _rule("any-ct", {"Modality": "CT"}, ["ct-tissue", "mr-brain-mask"]),
    ]
    study = StudyInput(
        "9.9", (SeriesCandidate("9.9.1", _ct("", ["ORIGINAL", "PRIMARY", "AXIAL"], "1"), 1),)
    )
    assert format_report(build_report(study, rules)) == [
        "study 9.9 (PatientID PHANTOM1, 1 series)",
        '  series 9.9.1  CT  ""  1 instance',
        "    rule ct-tissue: no — min_instances: needs 10, the series has 1",
        "    rule mr-brain: no — Modality: expected 'MR', found 'CT'",
        "    rule any-ct: matches",
        "    model ct-tissue: skipped — 1 slices, the model needs at least 2",
        "    model mr-brain-mask: skipped — modality CT, the model takes MR",
    ]
    two_rules = [
        _rule("a", {"Modality": "CT"}, ["ct-tissue"], send_to=["pacs"]),
        _rule("b", {"SliceThickness": {"max": 2}}, ["ct-tissue"], send_to=["archive", "pacs"]),
    ]
    study = StudyInput(
        "9.9", (SeriesCandidate("9.9.1", _ct("", ["ORIGINAL", "PRIMARY", "AXIAL"], "1"), 5),)
    )
    assert format_report(build_report(study, two_rules))[-1] == (
        "    model ct-tissue: would run (rules a, b; send to pacs, archive)"
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0), ("1d", 86400.0), ("1.5h", 5400.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2", "h", "2x", "-1h", "2 hours"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_studies_from_files_groups_by_study_and_series(tmp_path: Path) -> None:
    volume = np.zeros((3, 4, 4), dtype=np.int16)
    first = write_ct_series(volume, tmp_path / "a", spacing_mm=(1, 1, 1), study_instance_uid="1.5")
    second = write_ct_series(
        volume[:2], tmp_path / "b" / "deep", spacing_mm=(1, 1, 1), study_instance_uid="1.5"
    )
    other = write_ct_series(volume[:1], tmp_path / "c", spacing_mm=(1, 1, 1))
    (tmp_path / "b" / "notes.txt").write_text("not DICOM")
    header_only = Dataset()  # DICOM, but no study or series (as a DICOMDIR)
    header_only.SOPClassUID = "1.2.840.10008.1.3.10"
    header_only.SOPInstanceUID = "1.2.3.4"
    header_only.file_meta = FileMetaDataset()
    header_only.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    header_only.save_as(tmp_path / "no-uids.dcm", enforce_file_format=True)
    assert dcmread(tmp_path / "no-uids.dcm").SOPInstanceUID == "1.2.3.4"

    studies, passed_over = studies_from_files([tmp_path, first[0]])  # a file twice counts once
    assert passed_over == 2
    assert [s.study_instance_uid for s in studies] == ["1.5", _uids(other[0])[0]]
    counts = [[(c.series_instance_uid, c.instance_count) for c in s.candidates] for s in studies]
    assert counts == [
        [(_uids(first[0])[1], 3), (_uids(second[0])[1], 2)],
        [(_uids(other[0])[1], 1)],
    ]


def _uids(path: Path) -> tuple[str, str]:
    header = dcmread(path, stop_before_pixels=True)
    return str(header.StudyInstanceUID), str(header.SeriesInstanceUID)


def test_candidate_from_paths(tmp_path: Path) -> None:
    (path,) = write_ct_series(np.zeros((1, 4, 4), dtype=np.int16), tmp_path, spacing_mm=(1, 1, 1))
    good = candidate_from_paths("1.1", [path, path])
    assert good.header is not None
    assert good.instance_count == 2
    assert good.header.Modality == "CT"
    assert "PixelData" not in good.header
    assert candidate_from_paths("1.1", []) == SeriesCandidate(
        "1.1", None, 0, "no instances on disk"
    )
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a DICOM file")
    bad = candidate_from_paths("1.1", [broken])
    assert bad.header is None
    assert bad.instance_count == 1
    assert bad.unreadable_reason is not None
    assert bad.unreadable_reason.startswith("cannot read the header of broken.dcm: ")

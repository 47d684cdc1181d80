"""Study routing: rules, what models accept, and the best series when several fit."""

from __future__ import annotations

from typing import Any

from pydicom import Dataset

from node.config import Rule
from node.routing import SeriesCandidate, plan_study
from node.state import PlannedJob, SeriesPlan

AXIAL = [1, 0, 0, 0, 1, 0]
CORONAL = [1, 0, 0, 0, 0, -1]
RULES = [Rule.model_validate({"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "send_to": ["pacs"]})]  # fmt: skip


def _series(uid: str, count: int, **attributes: Any) -> SeriesCandidate:
    header = Dataset()
    header.Modality = "CT"
    header.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    header.ImageOrientationPatient = AXIAL
    header.SliceThickness = "1.0"
    for keyword, value in attributes.items():
        setattr(header, keyword, value)
    return SeriesCandidate(uid, header, count)


def _job(reason: str | None = None) -> PlannedJob:
    return PlannedJob("ct-tissue", "ct", ("pacs",), reason)


def test_the_thinnest_axial_original_series_runs_and_the_others_are_skipped() -> None:
    plans = plan_study(
        [
            _series("1.1", 300, SliceThickness="5.0"),
            _series("1.2", 300, SliceThickness="1.0"),
            _series("1.3", 600, SliceThickness="0.6", ImageType=["DERIVED", "SECONDARY", "AXIAL"]),
            _series("1.4", 600, SliceThickness="0.6", ImageOrientationPatient=CORONAL),
        ],
        RULES,
    )
    better = "series 1.2 of the same study fits the model better"
    assert plans == {
        "1.1": SeriesPlan([_job(better)]),
        "1.2": SeriesPlan([_job()]),
        "1.3": SeriesPlan([_job(better)]),
        "1.4": SeriesPlan([_job(better)]),
    }


def test_unfit_series_are_skipped_with_the_reason_and_do_not_compete() -> None:
    plans = plan_study(
        [_series("1.1", 1, SliceThickness="0.5"), _series("1.2", 40, SliceThickness="3")], RULES
    )
    assert plans["1.1"] == SeriesPlan([_job("1 slices, the model needs at least 2")])
    assert plans["1.2"] == SeriesPlan([_job()])


def test_unmatched_and_unreadable_series_are_ignored_with_the_reason() -> None:
    plans = plan_study(
        [
            _series("1.1", 40, Modality="MR"),
            SeriesCandidate("1.2", None, 3, "cannot read the header of x.dcm: truncated"),
        ],
        RULES,
    )
    assert plans == {
        "1.1": SeriesPlan([], "no rule matches"),
        "1.2": SeriesPlan([], "cannot read the header of x.dcm: truncated"),
    }


def test_an_image_model_runs_on_every_series_it_takes() -> None:
    """Two radiograph series of one study (PA and lateral) both go to the classifier."""
    rules = [Rule.model_validate({"name": "xr", "match": {"Modality": "DX"}, "models": ["xr-nodule-demo"], "send_to": ["pacs"]})]  # fmt: skip
    plans = plan_study([_series("1.1", 1, Modality="DX"), _series("1.2", 1, Modality="DX")], rules)
    job = PlannedJob("xr-nodule-demo", "xr", ("pacs",), None)
    assert plans == {"1.1": SeriesPlan([job]), "1.2": SeriesPlan([job])}

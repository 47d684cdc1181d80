"""Study routing: rules, what models accept, and the best series when several fit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydicom import Dataset

from models import registry
from models.base import Accepts, SegmentationModel, Volume
from node.config import Rule
from node.routing import SeriesCandidate, plan_study
from node.rules import input_conditions
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


class _FourSequences(SegmentationModel):
    """A multi-series model for routing: four named inputs matched by description."""

    name = "four-seq-test"
    version = "1"
    labels = ()
    accepts = Accepts(modalities=("MR",))
    inputs = {
        "t1c": {"SeriesDescription": {"regex": r"(?i)t1.*(post|gd)"}},
        "t1": {"SeriesDescription": {"regex": r"(?i)t1(?!.*(post|gd))"}},
        "t2": {"SeriesDescription": {"regex": r"(?i)t2(?!.*flair)"}},
        "flair": {"SeriesDescription": {"regex": r"(?i)flair"}},
    }
    reference_input = "t1c"

    def predict(self, volume: Volume) -> Any:
        raise NotImplementedError


MR_RULES = [Rule.model_validate({"name": "mr", "match": {"Modality": "MR"}, "models": ["four-seq-test"], "send_to": ["pacs"]})]  # fmt: skip


@pytest.fixture
def four_sequences() -> Iterator[None]:
    state = registry.checkpoint()
    registry.register_model(_FourSequences)
    yield
    registry.rollback(state)


def _mr(uid: str, description: str, count: int = 100, **attributes: Any) -> SeriesCandidate:
    return _series(uid, count, Modality="MR", SeriesDescription=description, **attributes)


@pytest.mark.usefixtures("four_sequences")
def test_each_input_gets_its_best_series_and_the_job_runs_on_the_reference() -> None:
    plans = plan_study(
        [
            _mr("1.1", "T1 post Gd"),
            _mr("1.2", "T1 3D"),
            _mr("1.3", "T2 TSE", SliceThickness="5.0"),
            _mr("1.4", "T2 TSE thin", SliceThickness="2.0"),  # the better T2
            _mr("1.5", "FLAIR"),
            _mr("1.6", "DWI b1000"),  # no input takes it
        ],
        MR_RULES,
    )
    (job,) = plans["1.1"].jobs
    assert job.skipped_reason is None
    assert job.reference_input == "t1c"
    assert dict(job.other_inputs) == {"t1": "1.2", "t2": "1.4", "flair": "1.5"}
    reasons = {uid: plans[uid].jobs[0].skipped_reason for uid in ("1.2", "1.3", "1.4", "1.6")}
    assert reasons["1.2"] == "input 't1' of four-seq-test, which runs on series 1.1 (input 't1c')"
    assert reasons["1.4"] == "input 't2' of four-seq-test, which runs on series 1.1 (input 't1c')"
    fits_none = "matches no input of four-seq-test, or another series fits that input better"
    assert reasons["1.3"] == reasons["1.6"] == fits_none


@pytest.mark.usefixtures("four_sequences")
def test_a_missing_input_skips_every_series_naming_it() -> None:
    plans = plan_study(
        [_mr("1.1", "T1 post Gd"), _mr("1.2", "T1 3D"), _mr("1.3", "T2 TSE")], MR_RULES
    )
    for uid in ("1.1", "1.2", "1.3"):
        (job,) = plans[uid].jobs
        assert job.skipped_reason == (
            "four-seq-test needs a series for input(s) flair, and none of the study's series "
            "matches"
        )


def test_input_conditions_are_checked_by_name() -> None:
    with pytest.raises(ValueError, match=r"inputs\.t1\.match\.SeriesDescription: .*regular"):
        input_conditions({"t1": {"SeriesDescription": {"regex": "(unclosed"}}})

"""Rules: attribute conditions, min_instances and merging of models across rules."""

from __future__ import annotations

from typing import Any

import pytest

from node.config import MatchCondition, Rule
from node.rules import RoutedModel, condition_matches, route_series, rule_matches
from tests.dicom_factory import header

CT = header(
    Modality="CT",
    ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
    SeriesDescription="Thorax 1.0 B31f",
    SliceThickness="1.0",
    BodyPartExamined="CHEST",
)


def _rule(match: dict[str, Any], **extra: Any) -> Rule:
    return Rule.model_validate({"name": "r", "match": match, "models": ["ct-tissue"], **extra})


@pytest.mark.parametrize(
    ("condition", "values", "expected"),
    [
        ("CT", ["CT"], True),
        ("CT", ["MR"], False),
        ("CT", None, False),
        (1.0, ["1.000"], True),
        (1.0, ["1.5"], False),
        (1.0, ["thin"], False),
        ({"regex": "(?i)thorax"}, ["Thorax 1.0 B31f"], True),
        ({"regex": "^B31"}, ["Thorax 1.0 B31f"], False),
        ({"contains": "AXIAL"}, ["ORIGINAL", "PRIMARY", "AXIAL"], True),
        ({"contains": "AX"}, ["ORIGINAL", "PRIMARY", "AXIAL"], False),  # whole values only
        ({"contains": "B31"}, ["Thorax 1.0 B31f"], True),  # substring of a single value
        ({"min": 0.5, "max": 3}, ["1.0"], True),
        ({"min": 0.5, "max": 3}, ["5"], False),
        ({"min": 2}, ["1.0"], False),
        ({"max": 2}, ["1.0"], True),
        ({"min": 0}, ["n/a"], False),
        ({"min": 0}, ["1", "2"], False),
    ],
)
def test_condition(condition: Any, values: list[str] | None, expected: bool) -> None:
    assert condition_matches(MatchCondition.model_validate(condition), values) is expected


def test_rule_needs_every_condition_and_enough_instances() -> None:
    rule = _rule({"Modality": "CT", "ImageType": {"contains": "AXIAL"}}, min_instances=20)
    assert rule_matches(rule, CT, 20)
    assert not rule_matches(rule, CT, 19)
    assert not rule_matches(_rule({"Modality": "CT", "BodyPartExamined": "HEAD"}), CT, 50)
    assert not rule_matches(_rule({"ContrastBolusAgent": {"regex": "."}}), CT, 50)


def test_route_merges_models_and_destinations_in_order() -> None:
    rules = [
        Rule(name="chest", match={"Modality": MatchCondition(equals="CT")}, models=["ct-tissue"], send_to=["pacs"]),
        Rule(name="research", match={}, models=["ct-tissue"], send_to=["research", "pacs"]),
        Rule(name="mr", match={"Modality": MatchCondition(equals="MR")}, models=["ct-tissue"], send_to=["x"]),
    ]  # fmt: skip
    assert route_series(rules, CT, 10) == [
        RoutedModel(
            model="ct-tissue", rules=("chest", "research"), destinations=("pacs", "research")
        )
    ]
    assert route_series(rules[2:], CT, 10) == []


def test_shadow_rules_run_models_without_sending() -> None:
    shadow = Rule(
        name="trial", models=["ct-tissue", "ct-bone-demo"], send_to=["pacs"], mode="shadow"
    )
    live = Rule(name="chest", models=["ct-tissue"], send_to=["viewer"])
    assert route_series([shadow], CT, 10) == [
        RoutedModel(model="ct-tissue", rules=("trial",), destinations=(), shadow=True),
        RoutedModel(model="ct-bone-demo", rules=("trial",), destinations=(), shadow=True),
    ]
    # A live rule for the same model makes it live, sending to the live rule's destinations.
    assert route_series([shadow, live], CT, 10) == [
        RoutedModel(model="ct-tissue", rules=("trial", "chest"), destinations=("viewer",)),
        RoutedModel(model="ct-bone-demo", rules=("trial",), destinations=(), shadow=True),
    ]

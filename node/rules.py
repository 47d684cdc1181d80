"""Rules: which models a complete series goes to, decided from its DICOM attributes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydicom import Dataset
from pydicom.multival import MultiValue

from node.config import MatchCondition, Rule

__all__ = [
    "RoutedModel",
    "attribute_values",
    "condition_matches",
    "input_conditions",
    "route_series",
    "rule_matches",
    "series_matches",
]


@dataclass(frozen=True)
class RoutedModel:
    """A model a series goes to, with the rules that chose it and their destinations;
    ``shadow`` when only shadow rules chose it (it runs, nothing is sent)."""

    model: str
    rules: tuple[str, ...]
    destinations: tuple[str, ...]
    shadow: bool = False


def attribute_values(header: Dataset, keyword: str) -> list[str] | None:
    """An attribute's values as stripped strings, as rules see them; None when the
    attribute is absent or empty (no rule condition matches it then)."""
    if keyword not in header:
        return None
    value = header.data_element(keyword)
    if value is None or value.value is None or value.value == "":
        return None
    raw = value.value
    items = list(raw) if isinstance(raw, MultiValue | list | tuple) else [raw]
    return [str(item).strip() for item in items]


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def condition_matches(condition: MatchCondition, values: list[str] | None) -> bool:
    """Whether an attribute's values satisfy one condition; a missing attribute never does.

    ``equals`` compares the whole value (multiple values joined by ``\\``), numerically
    when both sides are numbers; ``regex`` searches it; ``contains`` asks whether one of
    the values equals the text (for multi-valued attributes such as ImageType) or, for a
    single value, whether the text occurs in it; ``min``/``max`` bound a numeric value.
    """
    if values is None:
        return False
    joined = "\\".join(values)
    if condition.equals is not None:
        expected = condition.equals
        if isinstance(expected, float | int):
            number = _as_float(joined)
            return number is not None and number == float(expected)
        return joined == str(expected).strip()
    if condition.regex is not None:
        return re.search(condition.regex, joined) is not None
    if condition.contains is not None:
        if len(values) > 1:
            return condition.contains in values
        return condition.contains in joined
    number = _as_float(values[0]) if len(values) == 1 else None
    if number is None:
        return False
    if condition.min is not None and number < condition.min:
        return False
    return not (condition.max is not None and number > condition.max)


def series_matches(conditions: dict[str, MatchCondition], header: Dataset) -> bool:
    """Whether a series' header satisfies every condition."""
    return all(
        condition_matches(condition, attribute_values(header, keyword))
        for keyword, condition in conditions.items()
    )


def input_conditions(inputs: dict[str, dict[str, Any]]) -> dict[str, dict[str, MatchCondition]]:
    """A multi-series model's input matches as conditions, in the inputs' order.

    Raises
    ------
    ValueError
        Naming the input, attribute and what is wrong with its condition.
    """
    parsed: dict[str, dict[str, MatchCondition]] = {}
    for name, match in inputs.items():
        parsed[name] = {}
        for keyword, raw in match.items():
            try:
                parsed[name][keyword] = MatchCondition.model_validate(raw)
            except ValidationError as exc:
                problem = "; ".join(str(e["msg"]) for e in exc.errors())
                raise ValueError(f"inputs.{name}.match.{keyword}: {problem}") from exc
    return parsed


def rule_matches(rule: Rule, header: Dataset, instance_count: int) -> bool:
    """Whether a series (one instance's header and how many instances) matches ``rule``."""
    return instance_count >= rule.min_instances and series_matches(rule.match, header)


def route_series(rules: Sequence[Rule], header: Dataset, instance_count: int) -> list[RoutedModel]:
    """The models a series goes to; each model once, with the destinations of every live
    rule that chose it (in config order). A model only shadow rules chose is ``shadow``,
    without destinations; a live rule for the same model makes it live."""
    chosen: dict[str, tuple[list[str], list[str], list[bool]]] = {}
    for rule in rules:
        if not rule_matches(rule, header, instance_count):
            continue
        shadow = rule.mode == "shadow"
        for model in rule.models:
            rule_names, destinations, modes = chosen.setdefault(model, ([], [], []))
            rule_names.append(rule.name)
            modes.append(shadow)
            if not shadow:
                destinations.extend(d for d in rule.send_to if d not in destinations)
    return [
        RoutedModel(
            model=model, rules=tuple(names), destinations=tuple(destinations), shadow=all(modes)
        )
        for model, (names, destinations, modes) in chosen.items()
    ]

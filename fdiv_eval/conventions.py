"""Conventions and compatibility of audit reports.

Two reports may be put side by side only when their numbers mean the same
thing: the same logarithm base and units, the same definitions of JS, TV and
Hellinger, the same interval level, and the same experiment (suite name,
target, base model and horizon). ``compatibility_record`` writes those facts
into a report; ``check_compatible`` compares two records and names the first
field that differs.
"""

from __future__ import annotations

import re
from typing import Any

from fdiv_eval.errors import InvalidInputError
from fdiv_eval.metrics import METRICS, MetricInfo

CONVENTIONS_RECORD = {
    "logarithm": "natural",
    "divergence_unit": "nats",
    "js": "divergence, no square root, at most log 2",
    "tv": "1/2 sum |pi - p|, at most 1",
    "hellinger": "squared, 1 - sum sqrt(pi p), at most 1",
    "interval": "two-sided 95% confidence interval",
}
"""The definitions every number of a report follows; a report written under other definitions differs here."""

_UNIT_SUFFIXES = {"nats": "_nats", "tokens": "_tokens", "0-100": "_0_100", "fraction": "", "": ""}

# Metric keys whose bare name hides a convention that readers often get wrong.
_CONVENTION_NAMES = {
    "js": "js_divergence_nats",
    "hellinger": "hellinger_squared",
}
_CORPUS_DISTINCT = re.compile(r"^distinct_\d+$")


def unit_name(key: str, info: MetricInfo | None = None) -> str:
    """Return the metric's name with its convention and unit, for example ``js_divergence_nats``.

    Metrics in nats get ``_nats``, token counts ``_tokens``, Self-BLEU
    ``_0_100``; corpus-level distinct-n gets ``_corpus``. Unitless
    divergences such as ``tv`` keep their key.
    """
    if key in _CONVENTION_NAMES:
        return _CONVENTION_NAMES[key]
    info = info or METRICS.get(key)
    name = key
    if _CORPUS_DISTINCT.match(key):
        name += "_corpus"
    unit = info.unit if info is not None else ""
    suffix = _UNIT_SUFFIXES.get(unit, "_" + re.sub(r"\W+", "_", unit).strip("_"))
    if suffix and not name.endswith(suffix):
        name += suffix
    return name


def compatibility_record(suite_name: str, target: dict, base_model: str, max_new_tokens: int) -> dict[str, Any]:
    """Return the facts that must agree before two reports are compared."""
    return {
        "conventions": dict(CONVENTIONS_RECORD),
        "suite": suite_name,
        "target": target,
        "base_model": base_model,
        "max_new_tokens": max_new_tokens,
        "metric_units": {key: info.unit for key, info in METRICS.items()},
    }


def record_from_legacy(report: dict) -> dict[str, Any]:
    """Derive the compatibility record of a schema-1 report, which predates it."""
    settings = report.get("settings", {})
    record = compatibility_record(report["suite"]["name"], report.get("target", {}),
                                  settings.get("base_model"), settings.get("max_new_tokens"))
    record["metric_units"] = {key: data.get("unit", "") for key, data in report.get("metrics", {}).items()}
    return record


def _first_difference(left: Any, right: Any, path: str) -> tuple[str, Any, Any] | None:
    if isinstance(left, dict) and isinstance(right, dict):
        for key in sorted(set(left) | set(right)):
            if key not in left or key not in right:
                return (f"{path}.{key}", left.get(key, "<missing>"), right.get(key, "<missing>"))
            found = _first_difference(left[key], right[key], f"{path}.{key}")
            if found:
                return found
        return None
    return None if left == right else (path, left, right)


def check_compatible(first: dict, second: dict, first_name: str, second_name: str) -> None:
    """Raise InvalidInputError naming the first compatibility field where two reports differ.

    Metric units are compared only for metrics that both reports define, so a
    report from a newer version with extra metrics stays comparable.
    """
    left = dict(first)
    right = dict(second)
    units_left = left.pop("metric_units", {})
    units_right = right.pop("metric_units", {})
    shared = sorted(set(units_left) & set(units_right))
    left["metric_units"] = {key: units_left[key] for key in shared}
    right["metric_units"] = {key: units_right[key] for key in shared}
    difference = _first_difference(left, right, "compatibility")
    if difference is not None:
        field, value_left, value_right = difference
        raise InvalidInputError(
            f"cannot compare {first_name} and {second_name}: {field} differs ({value_left!r} vs {value_right!r}); "
            "compare only reports of the same suite, target and conventions"
        )

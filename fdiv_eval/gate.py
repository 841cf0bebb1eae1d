"""Regression gate: does a current audit show a real regression against a baseline audit?

For each rule (metric, better direction, tolerance, confidence) and each model
present in both reports, the worsening is Δ = current − baseline for a
lower-is-better metric and baseline − current for a higher-is-better one.
The rule fails only when a one-sided test rejects Δ ≤ tolerance at the
rule's confidence, that is, when the lower confidence bound
Δ − z_c·se(Δ) exceeds the tolerance (z_c: the standard normal quantile at the
confidence). Monte Carlo noise alone therefore fails a rule with probability
at most 1 − confidence, and less when the tolerance is positive.

se(Δ) combines both audits' standard errors as independent,
se² = se_current² + se_baseline², unless the two audits share their base
sample (same seed, base model and size). Then log Ẑ is the same number in
both, its error is common to both sides, and ``paired_standard_errors``
recomputes the policy divergences' errors with that shared term differenced
out, and the base-sample forward KL as a paired difference over the shared
samples.

Each rule applies to every rule/model pair independently: k rules each at
confidence c raise a false alarm with probability at most k·(1 − c).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import norm

from fdiv_eval.divergences import DIVERGENCES
from fdiv_eval.errors import InvalidInputError
from fdiv_eval.estimates import Estimate
from fdiv_eval.metrics import METRICS
from fdiv_eval.suite import CheckRule, validate_check_rule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuleResult:
    """The verdict of one rule on one model."""

    rule: CheckRule
    model: str
    direction: str
    """``lower`` or ``higher``: which way the metric is better."""
    current: Estimate
    baseline: Estimate
    worsening: float
    """Current minus baseline, signed so that a positive value is worse, in the metric's unit."""
    standard_error: float
    """Standard error of ``worsening``."""
    lower_bound: float
    """One-sided lower confidence bound of ``worsening`` at the rule's confidence."""
    p_value: float
    """One-sided p-value of the null hypothesis worsening ≤ tolerance."""
    paired: bool
    failed: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def metric(self) -> str:
        return self.rule.metric


def _rule_direction(rule: CheckRule) -> str:
    return rule.direction or METRICS[rule.metric].direction


def evaluate_rule(rule: CheckRule, model: str, current: Estimate, baseline: Estimate,
                  paired_standard_error: float | None = None) -> RuleResult:
    """Test whether ``current`` is worse than ``baseline`` by more than the rule's tolerance."""
    direction = _rule_direction(rule)
    sign = 1.0 if direction == "lower" else -1.0
    notes = []
    if not current.reliable:
        notes.append("current estimate flagged unreliable")
    if not baseline.reliable:
        notes.append("baseline estimate flagged unreliable")

    if math.isnan(current.value) or math.isnan(baseline.value):
        notes.append("a value is NaN, so the metric could not be estimated")
        return RuleResult(rule, model, direction, current, baseline, math.nan, math.nan, math.nan, 0.0,
                          False, True, tuple(notes))

    if math.isinf(current.value) or math.isinf(baseline.value):
        # Infinite values carry no sampling error: compare them as exact numbers.
        worsening = math.inf if current.value != baseline.value else 0.0
        if current.value == baseline.value:
            notes.append("both values are infinite")
        else:
            worsening = sign * (current.value - baseline.value)
        failed = worsening > rule.tolerance
        return RuleResult(rule, model, direction, current, baseline, worsening, 0.0, worsening,
                          0.0 if failed else 1.0, False, failed, tuple(notes))

    worsening = sign * (current.value - baseline.value)
    paired = paired_standard_error is not None
    if paired:
        standard_error = paired_standard_error
    else:
        standard_error = math.sqrt(_finite_or_zero(current.standard_error) ** 2
                                   + _finite_or_zero(baseline.standard_error) ** 2)
    critical = float(norm.ppf(rule.confidence))
    lower_bound = worsening - critical * standard_error
    if standard_error > 0:
        p_value = float(norm.sf((worsening - rule.tolerance) / standard_error))
    else:
        p_value = 0.0 if worsening > rule.tolerance else 1.0
    failed = lower_bound > rule.tolerance
    return RuleResult(rule, model, direction, current, baseline, worsening, standard_error, lower_bound,
                      p_value, paired, failed, tuple(notes))


def _finite_or_zero(value: float) -> float:
    # NOTE: an estimate whose standard error is NaN (all or no samples accepted)
    # contributes no variance here, which makes the rule stricter, not looser.
    return value if math.isfinite(value) else 0.0


def check_reports(rules: tuple[CheckRule, ...], current: dict, baseline: dict,
                  paired_errors: dict[tuple[str, str], float] | None = None) -> list[RuleResult]:
    """Apply every rule to every model that both reports contain (or the rule's own model).

    Raises InvalidInputError when a rule names a model or metric that a report lacks,
    or when the reports share no model.
    """
    if not rules:
        raise InvalidInputError("the suite declares no checks; add a `checks:` list of metric, direction, tolerance")
    paired_errors = paired_errors or {}
    current_models = {entry["name"]: entry for entry in current["models"]}
    baseline_models = {entry["name"]: entry for entry in baseline["models"]}
    shared = [name for name in current_models if name in baseline_models]
    if not shared:
        raise InvalidInputError(
            f"the current report (models {sorted(current_models)}) and the baseline (models "
            f"{sorted(baseline_models)}) share no model name; audit the same names with --model NAME=PATH"
        )

    results = []
    for index, rule in enumerate(rules):
        validate_check_rule(rule, f"checks[{index}]")
        if rule.model is not None and rule.model not in shared:
            raise InvalidInputError(
                f"check on {rule.metric!r} names model {rule.model!r}, which is not in both reports "
                f"(shared models: {', '.join(shared)})"
            )
        for model in ([rule.model] if rule.model else shared):
            estimates = []
            for label, entry in (("current", current_models[model]), ("baseline", baseline_models[model])):
                if rule.metric not in entry["metrics"]:
                    raise InvalidInputError(
                        f"the {label} report has no metric {rule.metric!r} for model {model!r}; "
                        "re-audit with this version of fdiv-eval or drop the rule"
                    )
                estimates.append(Estimate.from_dict(entry["metrics"][rule.metric]))
            results.append(evaluate_rule(rule, model, estimates[0], estimates[1],
                                         paired_errors.get((model, rule.metric))))
    return results


def _read_parquet(path: Path) -> dict | None:
    from datasets import Dataset

    if not path.is_file():
        return None
    return Dataset.from_parquet(str(path)).to_dict()


def _sample_only_divergence(name: str, columns: dict, log_z: float) -> tuple[float, float, float]:
    """Return (value, sampling-only standard error, d value / d log Z) of one policy divergence."""
    from fdiv_eval.estimators import policy_divergence

    divergence = DIVERGENCES[name]
    log_ratios = (np.asarray(columns["log_prob"], dtype=np.float64)
                  - np.asarray(columns["log_prob_base"], dtype=np.float64)
                  - np.asarray(columns["log_potential"], dtype=np.float64))

    def at(value: float) -> Estimate:
        return policy_divergence(divergence, log_ratios, Estimate(value, 0.0, value, value, 1, "fixed"))

    central = at(log_z)
    step = 1e-5
    derivative = (at(log_z + step).value - at(log_z - step).value) / (2 * step)
    return central.value, central.standard_error, derivative


def paired_standard_errors(current: dict, current_folder: Path, baseline: dict,
                           baseline_folder: Path) -> dict[tuple[str, str], float]:
    """Standard errors of current − baseline for metrics whose audits share the base sample.

    Returns an empty mapping unless both report folders hold a base sample with
    the same token ids and both reports the same log Ẑ. For every policy
    divergence, the errors of the two policy samples add and the shared log Ẑ
    error enters once, through the difference of the two derivatives. The
    base-sample forward KL becomes a paired ratio estimate over the shared
    samples, in which log Ẑ cancels.
    """
    from fdiv_eval.estimators import delta_method

    base_current = _read_parquet(current_folder / "samples" / "_base_sample.parquet")
    base_baseline = _read_parquet(baseline_folder / "samples" / "_base_sample.parquet")
    if base_current is None or base_baseline is None:
        return {}
    if base_current["token_ids"] != base_baseline["token_ids"]:
        return {}
    log_z_current = Estimate.from_dict(current["log_partition"])
    log_z_baseline = Estimate.from_dict(baseline["log_partition"])
    if log_z_current.value != log_z_baseline.value or not math.isfinite(log_z_current.value):
        return {}
    log_z_error = log_z_current.standard_error if math.isfinite(log_z_current.standard_error) else 0.0

    errors: dict[tuple[str, str], float] = {}
    baseline_models = {entry["name"]: entry for entry in baseline["models"]}
    for entry in current["models"]:
        name = entry["name"]
        if name not in baseline_models:
            continue
        other = baseline_models[name]
        columns_current = _read_parquet(current_folder / (entry.get("samples_file") or ""))
        columns_baseline = _read_parquet(baseline_folder / (other.get("samples_file") or ""))
        if columns_current is not None and columns_baseline is not None:
            for metric in DIVERGENCES:
                if metric not in entry["metrics"] or metric not in other["metrics"]:
                    continue
                value_c, error_c, slope_c = _sample_only_divergence(metric, columns_current, log_z_current.value)
                value_b, error_b, slope_b = _sample_only_divergence(metric, columns_baseline, log_z_current.value)
                reported_c = Estimate.from_dict(entry["metrics"][metric]).value
                reported_b = Estimate.from_dict(other["metrics"][metric]).value
                if not all(math.isfinite(v) for v in (value_c, value_b, error_c, error_b, slope_c, slope_b)):
                    continue
                if not (math.isclose(value_c, reported_c, rel_tol=1e-9, abs_tol=1e-12)
                        and math.isclose(value_b, reported_b, rel_tol=1e-9, abs_tol=1e-12)):
                    logger.warning("samples of %r do not reproduce the reported %s; not pairing it", name, metric)
                    continue
                errors[(name, metric)] = math.sqrt(error_c**2 + error_b**2 + ((slope_c - slope_b) * log_z_error) ** 2)

        column = f"log_prob__{name}"
        if column in base_current and column in base_baseline and "forward_kl_from_base" in entry["metrics"]:
            log_potential = np.asarray(base_current["log_potential"], dtype=np.float64)
            weights = np.exp(log_potential - log_potential.max())
            # KL_c − KL_b = E[w·(log π_b − log π_c)]/E[w] on the shared base sample.
            gap = np.asarray(base_baseline[column], dtype=np.float64) - np.asarray(base_current[column], dtype=np.float64)
            gap = np.where(weights > 0, gap, 0.0)
            columns = np.stack([weights * gap, weights], axis=1)
            estimate = delta_method(columns, lambda means: means[0] / means[1], "paired-base-sample+delta")
            if math.isfinite(estimate.standard_error):
                errors[(name, "forward_kl_from_base")] = estimate.standard_error
    return errors


def report_folder(path: str | Path) -> Path:
    """Return the folder of a report given as a report.json path or as its folder."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def _format(value: float) -> str:
    from fdiv_eval.report import format_number

    return format_number(value)


def _unit(metric: str) -> str:
    info = METRICS.get(metric)
    return f" {info.unit}" if info is not None and info.unit else ""


def format_verdict(result: RuleResult) -> str:
    """Format one line: FAIL or pass, model and metric, both values, the worsening with its bound and p-value."""
    status = "FAIL" if result.failed else "pass"
    unit = _unit(result.metric)
    better = "lower is better" if result.direction == "lower" else "higher is better"
    text = (
        f"{status} {result.model} {result.metric} ({better}): current {_format(result.current.value)} vs baseline "
        f"{_format(result.baseline.value)}{unit}; worse by {_format(result.worsening)}{unit}, "
        f"{result.rule.confidence:.0%} lower bound {_format(result.lower_bound)} vs tolerance "
        f"{_format(result.rule.tolerance)}, p = {result.p_value:.3g}"
    )
    if result.paired:
        text += ", paired"
    if result.notes:
        text += f" ({'; '.join(result.notes)})"
    return text


def render_check_markdown(results: list[RuleResult], current_name: str, baseline_name: str) -> str:
    """Render a Markdown summary for a pull-request comment or a CI step summary."""
    failures = [result for result in results if result.failed]
    headline = (f"**{len(failures)} of {len(results)} checks failed**" if failures
                else f"**All {len(results)} checks passed**")
    lines = [
        "## fdiv check",
        "",
        f"{headline}: `{current_name}` against baseline `{baseline_name}`. A check fails only when the "
        "worsening exceeds its tolerance at the stated one-sided confidence.",
        "",
        "| | model | metric | better | current | baseline | worse by | lower bound | tolerance | confidence | p |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        mark = "❌" if result.failed else "✅"
        lines.append(
            f"| {mark} | {result.model} | `{result.metric}` | {result.direction} | {_format(result.current.value)} "
            f"| {_format(result.baseline.value)} | {_format(result.worsening)} | {_format(result.lower_bound)} "
            f"| {_format(result.rule.tolerance)} | {result.rule.confidence:.0%} | {result.p_value:.3g} |"
        )
    notes = [(result, note) for result in results for note in result.notes]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {result.model} `{result.metric}`: {note}" for result, note in notes]
    lines.append("")
    return "\n".join(lines)


def render_junit(results: list[RuleResult], suite_name: str) -> str:
    """Render JUnit XML with one test case per rule and model, failed ones carrying their verdict line."""
    from xml.etree import ElementTree

    failures = sum(result.failed for result in results)
    testsuite = ElementTree.Element("testsuite", name=f"fdiv check {suite_name}", tests=str(len(results)),
                                    failures=str(failures), errors="0", skipped="0")
    for result in results:
        case = ElementTree.SubElement(testsuite, "testcase", classname=f"fdiv.{suite_name}.{result.model}",
                                      name=result.metric)
        verdict = format_verdict(result)
        if result.failed:
            failure = ElementTree.SubElement(case, "failure", message=verdict, type="regression")
            failure.text = verdict
        else:
            ElementTree.SubElement(case, "system-out").text = verdict
    ElementTree.indent(testsuite)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(testsuite, encoding="unicode") + "\n"

"""fdiv check: the one-sided test of each rule, rule loading, paired errors and the CLI's exit codes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import yaml
from scipy.stats import norm

from fdiv_eval.cli import main
from fdiv_eval.errors import InvalidInputError
from fdiv_eval.estimates import Estimate, constant_estimate, normal_estimate
from fdiv_eval.gate import check_reports, evaluate_rule, format_verdict, render_check_markdown, render_junit
from fdiv_eval.report import build_report, write_json
from fdiv_eval.suite import CheckRule, suite_from_dict

Z_99 = float(norm.ppf(0.99))


def _estimate(value: float, standard_error: float) -> Estimate:
    return normal_estimate(value, standard_error, 100, "mean+clt")


def test_worsening_beyond_tolerance_fails():
    # Δ = 1.0 − 0.5 = 0.5; se = √(0.1² + 0.1²) = 0.1414; bound = 0.5 − 2.326·0.1414 = 0.171 > 0.1.
    rule = CheckRule("forward_kl", tolerance=0.1, confidence=0.99)
    result = evaluate_rule(rule, "m", _estimate(1.0, 0.1), _estimate(0.5, 0.1))
    assert result.worsening == pytest.approx(0.5)
    assert result.standard_error == pytest.approx(math.sqrt(0.02))
    assert result.lower_bound == pytest.approx(0.5 - Z_99 * math.sqrt(0.02))
    assert result.p_value == pytest.approx(norm.sf(0.4 / math.sqrt(0.02)))
    assert result.failed


def test_worsening_within_noise_passes():
    # Bound = 0.3 − 2.326·0.1414 = −0.029 < 0: not shown to be worse at 99%.
    rule = CheckRule("forward_kl", tolerance=0.0, confidence=0.99)
    result = evaluate_rule(rule, "m", _estimate(0.8, 0.1), _estimate(0.5, 0.1))
    assert not result.failed
    assert result.p_value == pytest.approx(norm.sf(0.3 / math.sqrt(0.02)))


def test_improvement_passes_and_direction_is_respected():
    higher = CheckRule("constraint_satisfaction", tolerance=0.0)
    assert not evaluate_rule(higher, "m", _estimate(0.9, 0.01), _estimate(0.5, 0.01)).failed
    assert evaluate_rule(higher, "m", _estimate(0.5, 0.01), _estimate(0.9, 0.01)).failed
    result = evaluate_rule(higher, "m", _estimate(0.5, 0.01), _estimate(0.9, 0.01))
    assert result.worsening == pytest.approx(0.4)


def test_explicit_direction_overrides_metric():
    rule = CheckRule("kl_to_base", direction="lower", tolerance=0.0)
    assert evaluate_rule(rule, "m", _estimate(1.0, 0.01), _estimate(0.0, 0.0)).failed
    rule = CheckRule("kl_to_base", direction="higher", tolerance=0.0)
    assert not evaluate_rule(rule, "m", _estimate(1.0, 0.01), _estimate(0.0, 0.0)).failed


def test_exact_values_compare_without_error():
    rule = CheckRule("kl_to_base", direction="lower", tolerance=0.05)
    zero = constant_estimate(0.0, 100, "mean+clt")
    assert not evaluate_rule(rule, "m", zero, zero).failed
    assert evaluate_rule(rule, "m", constant_estimate(0.06, 100, "x"), zero).failed
    assert not evaluate_rule(rule, "m", constant_estimate(0.05, 100, "x"), zero).failed


def test_infinite_values():
    rule = CheckRule("reverse_kl", tolerance=10.0)
    infinite = constant_estimate(math.inf, 100, "x")
    assert evaluate_rule(rule, "m", infinite, _estimate(2.0, 0.1)).failed
    assert not evaluate_rule(rule, "m", _estimate(2.0, 0.1), infinite).failed
    both = evaluate_rule(rule, "m", infinite, infinite)
    assert not both.failed
    assert "both values are infinite" in both.notes


def test_nan_value_fails_with_note():
    rule = CheckRule("js")
    result = evaluate_rule(rule, "m", _estimate(math.nan, math.nan), _estimate(0.3, 0.01))
    assert result.failed
    assert any("NaN" in note for note in result.notes)


def test_paired_error_replaces_independent_error():
    rule = CheckRule("js", tolerance=0.0, confidence=0.99)
    unpaired = evaluate_rule(rule, "m", _estimate(0.32, 0.02), _estimate(0.30, 0.02))
    paired = evaluate_rule(rule, "m", _estimate(0.32, 0.02), _estimate(0.30, 0.02), paired_standard_error=0.005)
    assert not unpaired.failed
    assert paired.failed
    assert paired.paired
    assert paired.lower_bound == pytest.approx(0.02 - Z_99 * 0.005)


def test_false_alarm_rate_matches_confidence():
    # Two unbiased estimates of the same value: the rule fails with probability 1 − confidence.
    rng = np.random.default_rng(0)
    rule = CheckRule("js", tolerance=0.0, confidence=0.95)
    trials = 4_000
    values = rng.normal(0.3, 0.01, size=(trials, 2))
    failures = sum(evaluate_rule(rule, "m", _estimate(a, 0.01), _estimate(b, 0.01)).failed for a, b in values)
    # Binomial(4000, 0.05): mean 200, sd 13.8, so ±4 sd is 145..255.
    assert 145 <= failures <= 255


def test_unreliable_estimate_is_noted():
    rule = CheckRule("forward_kl")
    flagged = Estimate(1.0, 0.1, 0.8, 1.2, 100, "x", effective_sample_size=5.0)
    result = evaluate_rule(rule, "m", flagged, _estimate(1.0, 0.1))
    assert "current estimate flagged unreliable" in result.notes


def _report(models: dict[str, dict[str, Estimate]]) -> dict:
    entries = [{"name": name, "model": name, "metrics": metrics} for name, metrics in models.items()]
    settings = {"max_new_tokens": 8, "audit": {"seed": 1}, "base_model": "embedded:austen"}
    target = {"type": "word_list", "words": ["she"], "epsilon": 0.0}
    report = build_report("demo", "hash", target, _estimate(-1.0, 0.1), entries, settings)
    return json.loads(json.dumps(report))


def test_rules_apply_to_every_shared_model():
    current = _report({"a": {"js": _estimate(0.5, 0.01)}, "b": {"js": _estimate(0.3, 0.01)}, "c": {}})
    baseline = _report({"a": {"js": _estimate(0.3, 0.01)}, "b": {"js": _estimate(0.3, 0.01)}})
    results = check_reports((CheckRule("js"),), current, baseline)
    assert [(r.model, r.failed) for r in results] == [("a", True), ("b", False)]


def test_rule_errors_name_the_problem():
    current = _report({"a": {"js": _estimate(0.5, 0.01)}})
    baseline = _report({"a": {"tv": _estimate(0.3, 0.01)}})
    with pytest.raises(InvalidInputError, match="baseline report has no metric 'js' for model 'a'"):
        check_reports((CheckRule("js"),), current, baseline)
    with pytest.raises(InvalidInputError, match="names model 'z'"):
        check_reports((CheckRule("js", model="z"),), current, current)
    with pytest.raises(InvalidInputError, match="share no model name"):
        check_reports((CheckRule("js"),), current, _report({"b": {}}))
    with pytest.raises(InvalidInputError, match="declares no checks"):
        check_reports((), current, current)


def test_renderings_of_verdicts():
    rule = CheckRule("js", tolerance=0.01, confidence=0.99)
    failed = evaluate_rule(rule, "gdc", _estimate(0.5, 0.01), _estimate(0.3, 0.01))
    passed = evaluate_rule(rule, "rlhf", _estimate(0.3, 0.01), _estimate(0.3, 0.01))
    line = format_verdict(failed)
    assert line.startswith("FAIL gdc js (lower is better): current 0.5 vs baseline 0.3 nats; worse by 0.2 nats")
    assert "\n" not in line
    assert format_verdict(passed).startswith("pass rlhf js")

    markdown = render_check_markdown([failed, passed], "current", "baseline")
    assert "**1 of 2 checks failed**" in markdown
    assert "| ❌ | gdc | `js` |" in markdown

    junit = ElementTree.fromstring(render_junit([failed, passed], "demo"))
    assert junit.get("tests") == "2"
    assert junit.get("failures") == "1"
    cases = junit.findall("testcase")
    assert cases[0].find("failure").get("message") == line
    assert cases[1].find("failure") is None


SUITE = {"name": "demo", "target": {"words": ["she"], "epsilon": 0.001}, "train": {"methods": ["gdc"]}}


def test_suite_loads_checks():
    suite = suite_from_dict({**SUITE, "checks": [{"metric": "js", "tolerance": 0.01},
                                                 {"metric": "kl_to_base", "direction": "lower"}]})
    assert suite.checks == (CheckRule("js", None, 0.01), CheckRule("kl_to_base", "lower"))


def test_checks_do_not_change_suite_hash():
    assert suite_from_dict({**SUITE, "checks": [{"metric": "js"}]}).content_hash() == \
        suite_from_dict(SUITE).content_hash()


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"metric": "jsd"}, "suite field 'checks[0].metric' is 'jsd', not a metric of the audit"),
        ({"metric": "kl_to_base"}, "suite field 'checks[0].direction' must be 'lower' or 'higher'"),
        ({"metric": "js", "direction": "down"}, "suite field 'checks[0].direction' must be 'lower' or 'higher'"),
        ({"metric": "js", "tolerance": -1}, "suite field 'checks[0].tolerance' must be a finite number of at least 0"),
        ({"metric": "js", "confidence": 1.0}, "suite field 'checks[0].confidence' must lie strictly between"),
        ({"metric": "js", "confidence": 0.5}, "suite field 'checks[0].confidence' must lie strictly between"),
        ({"metric": "js", "tolerence": 0.1}, "unknown suite field 'checks[0].tolerence'"),
        ({"tolerance": 0.1}, "missing suite field 'checks[0].metric'"),
    ],
)
def test_invalid_checks_are_rejected(rule, message):
    with pytest.raises(InvalidInputError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        suite_from_dict({**SUITE, "checks": [rule]})


def _write(folder: Path, report: dict) -> Path:
    write_json(report, folder / "report.json")
    return folder


def _suite_file(tmp_path: Path, checks: list[dict]) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({**SUITE, "target": {"words": ["she"], "epsilon": 0.0}, "checks": checks}))
    return path


def test_check_cli_exit_codes_and_outputs(tmp_path, capsys):
    baseline = _write(tmp_path / "baseline", _report({"a": {"js": _estimate(0.3, 0.01)}}))
    same = _write(tmp_path / "same", _report({"a": {"js": _estimate(0.31, 0.01)}}))
    worse = _write(tmp_path / "worse", _report({"a": {"js": _estimate(0.5, 0.01)}}))
    suite = _suite_file(tmp_path, [{"metric": "js", "tolerance": 0.01}])

    assert main(["check", str(same), "--baseline", str(baseline), "--suite", str(suite)]) == 0
    assert "all 1 checks passed" in capsys.readouterr().out

    arguments = ["check", str(worse), "--baseline", str(baseline), "--suite", str(suite),
                 "--markdown", str(tmp_path / "check.md"), "--junit", str(tmp_path / "check.xml")]
    assert main(arguments) == 1
    output = capsys.readouterr().out
    assert "FAIL a js" in output
    assert "1 of 1 checks failed" in output
    assert "**1 of 1 checks failed**" in (tmp_path / "check.md").read_text()
    assert ElementTree.parse(tmp_path / "check.xml").getroot().get("failures") == "1"


def test_check_cli_invalid_inputs(tmp_path, capsys):
    baseline = _write(tmp_path / "baseline", _report({"a": {"js": _estimate(0.3, 0.01)}}))
    suite = _suite_file(tmp_path, [{"metric": "js"}])
    assert main(["check", str(tmp_path / "absent"), "--baseline", str(baseline), "--suite", str(suite)]) == 2
    assert "not found" in capsys.readouterr().err

    other = _report({"a": {"js": _estimate(0.3, 0.01)}})
    other["compatibility"]["target"]["words"] = ["he"]
    other_folder = _write(tmp_path / "other", other)
    assert main(["check", str(other_folder), "--baseline", str(baseline), "--suite", str(suite)]) == 2
    assert "compatibility.target.words differs" in " ".join(capsys.readouterr().err.split())

    other_suite = _suite_file(tmp_path, [{"metric": "js"}])
    data = yaml.safe_load(other_suite.read_text())
    data["name"] = "elsewhere"
    other_suite.write_text(yaml.safe_dump(data))
    assert main(["check", str(baseline), "--baseline", str(baseline), "--suite", str(other_suite)]) == 2
    assert "the reports come from suite 'demo'" in " ".join(capsys.readouterr().err.split())

    no_rules = _suite_file(tmp_path, [])
    assert main(["check", str(baseline), "--baseline", str(baseline), "--suite", str(no_rules)]) == 2
    assert "declares no checks" in capsys.readouterr().err

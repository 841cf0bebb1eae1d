"""The regression gate on real audits of the embedded model: noise passes, a degraded checkpoint fails."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from fdiv_eval.cli import main

REPOSITORY = Path(__file__).resolve().parents[1]


def _small_ci_suite(tmp_path: Path) -> Path:
    """suites/ci.yaml with its rules but smaller samples, so that three audits take seconds."""
    data = yaml.safe_load((REPOSITORY / "suites" / "ci.yaml").read_text())
    data["max_new_tokens"] = 16
    data["audit"].update(samples=128, base_samples=512, self_bleu_samples=20, bootstrap_resamples=20)
    data["runs_dir"] = str(tmp_path / "runs")
    path = tmp_path / "ci-small.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _degraded_checkpoint(folder: Path, noise: float = 0.01) -> Path:
    """The embedded model with N(0, noise²) added to every weight, saved with its tokenizer."""
    from fdiv_eval.sequences import load_model, load_tokenizer

    model = load_model("embedded:austen")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
    model.save_pretrained(folder)
    load_tokenizer("embedded:austen").save_pretrained(folder)
    return folder


def _audit(suite: Path, model: str, output: Path, seed: int) -> Path:
    arguments = ["--no-progress", "audit", str(suite), "--no-base", "--model", f"austen={model}",
                 "--seed", str(seed), "--output", str(output)]
    assert main(arguments) == 0
    return output


@pytest.fixture(scope="module")
def audits(tmp_path_factory) -> dict[str, Path]:
    """Four small audits: the baseline, a re-audit with another seed, and a degraded checkpoint at both seeds."""
    folder = tmp_path_factory.mktemp("gate")
    suite = _small_ci_suite(folder)
    degraded_model = str(_degraded_checkpoint(folder / "degraded-model"))
    return {
        "suite": suite,
        "baseline": _audit(suite, "embedded:austen", folder / "baseline", seed=1234),
        "reaudit": _audit(suite, "embedded:austen", folder / "reaudit", seed=98765),
        "degraded": _audit(suite, degraded_model, folder / "degraded", seed=98765),
        "degraded_same_seed": _audit(suite, degraded_model, folder / "degraded-same-seed", seed=1234),
    }


@pytest.mark.slow
def test_gate_passes_reaudit_and_fails_degraded(audits, tmp_path, capsys):
    suite, baseline = str(audits["suite"]), str(audits["baseline"])
    capsys.readouterr()

    assert main(["check", str(audits["reaudit"]), "--baseline", baseline, "--suite", suite]) == 0
    assert "all 6 checks passed" in capsys.readouterr().out

    junit = tmp_path / "degraded.xml"
    assert main(["check", str(audits["degraded"]), "--baseline", baseline, "--suite", suite,
                 "--junit", str(junit)]) == 1
    output = capsys.readouterr().out
    # Noise on the weights moves the model away from the base model, so the drift rule must catch it.
    assert "FAIL austen kl_to_base" in output
    assert 'failures="0"' not in junit.read_text()


@pytest.mark.slow
def test_shared_base_sample_gives_paired_errors(audits):
    from fdiv_eval.gate import paired_standard_errors
    from fdiv_eval.report import load_report

    baseline, degraded = audits["baseline"], audits["degraded_same_seed"]
    current_report, baseline_report = load_report(degraded), load_report(baseline)
    errors = paired_standard_errors(current_report, degraded, baseline_report, baseline)

    assert ("austen", "js") in errors
    assert ("austen", "forward_kl_from_base") in errors
    for metric in ("js", "tv", "forward_kl", "forward_kl_from_base"):
        if ("austen", metric) not in errors:
            continue
        current = current_report["models"][0]["metrics"][metric]["standard_error"]
        previous = baseline_report["models"][0]["metrics"][metric]["standard_error"]
        independent = math.sqrt(current**2 + previous**2)
        # The shared log Ẑ error enters once (or cancels), so pairing never widens the error.
        assert errors[("austen", metric)] <= independent * (1 + 1e-9), metric

    # Another seed draws another base sample: nothing is paired.
    reaudit = audits["reaudit"]
    assert paired_standard_errors(load_report(reaudit), reaudit, baseline_report, baseline) == {}

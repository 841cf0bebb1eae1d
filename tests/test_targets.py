"""Distributional and reward targets: the λ fit against exact enumeration, and target metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import root

from fdiv_eval.errors import EstimationError, InvalidInputError
from fdiv_eval.exact import enumerate_sequences
from fdiv_eval.moments import fit_coefficients
from fdiv_eval.scorers import RegexScorer, WordScorer
from fdiv_eval.sequences import load_model, load_tokenizer, sample, score
from fdiv_eval.target_metrics import policy_target_metrics, self_normalized_mean
from fdiv_eval.targets import DistributionalTarget, Feature, PointwiseTarget, RewardTarget, WordListFeature

HORIZON = 4


@pytest.fixture
def toy_space(toy_checkpoint):
    """Every sequence of the toy space with its exact base log-prob (float64 model) and decoded text."""
    tokenizer = load_tokenizer(toy_checkpoint)
    base = load_model(toy_checkpoint, dtype=torch.float64)
    batch = enumerate_sequences(len(tokenizer), tokenizer.eos_token_id, HORIZON, torch.tensor([0]), 0)
    log_base = score(base, batch).log_prob.numpy()
    texts = tokenizer.batch_decode(batch.sequences.tolist(), skip_special_tokens=True)
    return texts, log_base, base, tokenizer


def _exact_moments(features: np.ndarray, log_base: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    log_unnormalized = log_base + features @ coefficients
    weights = np.exp(log_unnormalized - log_unnormalized.max())
    return weights @ features / weights.sum()


def test_fit_matches_closed_form_lambda(toy_space):
    texts, log_base, _, _ = toy_space
    feature = WordScorer(["a"])(texts)
    # For one binary feature with base rate a, E_p[φ] = a·e^λ/(a·e^λ + 1 − a),
    # so the exact solution is λ = log(μ̄(1 − a)/(a(1 − μ̄))).
    base_rate = float(np.exp(log_base)[feature == 1].sum())
    desired = 0.8
    exact_lambda = math.log(desired * (1 - base_rate) / (base_rate * (1 - desired)))

    fit = fit_coefficients(feature[:, None], [desired], log_weights=log_base, names=["a"])

    assert fit.coefficients[0] == pytest.approx(exact_lambda, abs=1e-4)
    assert _exact_moments(feature[:, None], log_base, fit.coefficients)[0] == pytest.approx(desired, abs=1e-8)
    assert fit.achieved[0].value == pytest.approx(desired, abs=1e-8)


def test_fit_matches_exact_two_features(toy_space):
    texts, log_base, _, _ = toy_space
    features = np.stack([WordScorer(["b"])(texts), RegexScorer(r"c$")(texts)], axis=1)
    desired = np.array([0.6, 0.1])

    fit = fit_coefficients(features, desired, log_weights=log_base, names=["b", "ends_c"])

    # Oracle: solve E_p[φ](λ) = μ̄ with a generic root finder on the enumerated space.
    solution = root(lambda lam: _exact_moments(features, log_base, lam) - desired, x0=np.zeros(2))
    np.testing.assert_allclose(_exact_moments(features, log_base, solution.x), desired, atol=1e-10)
    np.testing.assert_allclose(fit.coefficients, solution.x, atol=1e-4)
    np.testing.assert_allclose(_exact_moments(features, log_base, fit.coefficients), desired, atol=1e-8)
    assert fit.iterations >= 1


def test_fit_on_base_samples_reaches_exact_moment(toy_space):
    texts, log_base, base, tokenizer = toy_space
    torch.manual_seed(0)
    batch = sample(base, torch.tensor([0]), 4000, HORIZON, 0, 0, seed=3)
    sampled_texts = tokenizer.batch_decode(batch.sequences.tolist(), skip_special_tokens=True)
    scorer = WordScorer(["a"])

    fit = fit_coefficients(scorer(sampled_texts)[:, None], [0.7], names=["a"])

    exact = _exact_moments(scorer(texts)[:, None], log_base, fit.coefficients)[0]
    achieved = fit.achieved[0]
    # The exact moment at the fitted λ lies within the fit's CI, widened to 4 standard errors.
    assert abs(exact - 0.7) < 4 * achieved.standard_error
    assert 0 < fit.effective_sample_size <= 4000


def test_fit_with_groups_averages_prompts():
    # Two prompts with base rates 0.2 and 0.6 (uniform weights over 10 samples each).
    first = np.array([1, 1] + [0] * 8, dtype=float)
    second = np.array([1] * 6 + [0] * 4, dtype=float)
    features = np.concatenate([first, second])[:, None]
    groups = np.repeat([0, 1], 10)

    fit = fit_coefficients(features, [0.5], groups=groups)

    lam = fit.coefficients[0]
    per_prompt = [rate * math.exp(lam) / (rate * math.exp(lam) + 1 - rate) for rate in (0.2, 0.6)]
    assert np.mean(per_prompt) == pytest.approx(0.5, abs=1e-9)


def test_fit_rejects_unreachable_moment():
    features = np.array([0.0, 1.0, 1.0, 0.0])[:, None]
    with pytest.raises(EstimationError, match=r"moment 1 of feature 'x' is outside the range .* \(0, 1\)"):
        fit_coefficients(features, [1.0], names=["x"])


def test_fit_rejects_feature_that_never_fires():
    with pytest.raises(EstimationError, match="feature 'x' never fires"):
        fit_coefficients(np.zeros((50, 1)), [0.5], names=["x"])


def test_fit_rejects_constant_feature():
    with pytest.raises(EstimationError, match="feature 'x' is constant"):
        fit_coefficients(np.full((50, 1), 2.0), [0.5], names=["x"])


def test_fit_rejects_jointly_unreachable_moments():
    # φ1 = φ2 on every sample, so their moments cannot differ.
    column = np.array([0.0, 1.0] * 20)
    with pytest.raises(EstimationError, match="cannot be reached together"):
        fit_coefficients(np.stack([column, column], axis=1), [0.3, 0.7], names=["x", "y"])


def test_fit_skips_samples_outside_hard_constraint():
    features = np.array([1.0, 0.0, 1.0, 0.0, 1.0])[:, None]
    log_weights = np.array([0.0, 0.0, -math.inf, 0.0, -math.inf])
    fit = fit_coefficients(features, [0.5], log_weights=log_weights)
    # Only the first, second and fourth samples remain: base rate 1/3, so λ = log 2.
    assert fit.coefficients[0] == pytest.approx(math.log(2.0), abs=1e-9)


def test_distributional_target_potential():
    target = DistributionalTarget(
        (Feature("a", WordScorer(["a"]), 0.5), Feature("b", WordScorer(["b"]), 0.2)),
        PointwiseTarget(WordListFeature(("c",)), 0.01),
        coefficients=(1.5, -0.5),
    )
    values = target.log_potential(["a b c", "a", "b"])
    np.testing.assert_allclose(values, [1.0, 1.5 + math.log(0.01), -0.5 + math.log(0.01)])


def test_unfitted_distributional_target_raises():
    target = DistributionalTarget((Feature("a", WordScorer(["a"]), 0.5),))
    with pytest.raises(InvalidInputError, match="no fitted coefficients"):
        target.log_potential(["a"])


@pytest.mark.parametrize("beta", [0.0, -1.0, math.nan, math.inf])
def test_reward_target_rejects_bad_beta(beta):
    with pytest.raises(InvalidInputError, match="target.beta must be a positive number"):
        RewardTarget(WordScorer(["a"]), beta)


def test_reward_target_potential_is_reward_over_beta():
    target = RewardTarget(WordScorer(["a"]), 0.25)
    np.testing.assert_allclose(target.log_potential(["a", "b"]), [4.0, 0.0])


def test_self_normalized_mean_exact_for_weights():
    # Samples from q uniform on 3 outcomes; P ∝ (1, 2, 5), g = (0, 1, 3): E_p[g] = (0 + 2 + 15)/8.
    values = np.array([0.0, 1.0, 3.0] * 100)
    log_weights = np.log(np.array([1.0, 2.0, 5.0] * 100))
    estimate = self_normalized_mean(values, log_weights)
    assert estimate.value == pytest.approx(17 / 8, rel=1e-12)
    assert estimate.ci_low < 17 / 8 < estimate.ci_high


def test_rlhf_objective_is_reward_minus_scaled_drift():
    target = RewardTarget(WordScorer(["a"]), 0.5)
    texts = ["a", "b", "a b", "c"]
    log_policy = np.array([-1.0, -2.0, -1.5, -3.0])
    log_base = np.array([-1.2, -1.8, -2.0, -2.5])
    metrics = policy_target_metrics(target, texts, None, log_policy, log_base)
    rewards = np.array([1.0, 0.0, 1.0, 0.0])
    assert metrics["reward"].value == pytest.approx(0.5)
    assert metrics["rlhf_objective"].value == pytest.approx(np.mean(rewards - 0.5 * (log_policy - log_base)))


def _run_tiny(tiny_suite, target: dict, methods: list[str]):
    import json

    import yaml

    from fdiv_eval.cli import main

    data = yaml.safe_load(tiny_suite.read_text())
    data["target"] = target
    data["train"]["methods"] = methods
    data["train"]["steps"] = 2
    tiny_suite.write_text(yaml.safe_dump(data))
    assert main(["--no-progress", "run", str(tiny_suite)]) == 0
    return json.loads((tiny_suite.parent / "reports" / "report.json").read_text())


def test_distributional_run_reports_moments(tiny_suite):
    target = {"type": "distributional", "fit_samples": 256,
              "features": [{"name": "she", "moment": 0.5, "scorer": {"type": "words", "words": ["she", "her"]}}]}
    report = _run_tiny(tiny_suite, target, ["gdc"])

    fit = report["target"]["fit"]
    assert fit["achieved_moments"]["she"]["value"] == pytest.approx(0.5, abs=1e-6)
    assert fit["iterations"] >= 1
    assert report["target"]["coefficients"][0] > 0
    for model in report["models"]:
        assert "moment/she" in model["metrics"]
        assert "constraint_satisfaction" not in model["metrics"]
        # The audit's base sample is independent of the fit sample, so E_p[φ] there is only near 0.5.
        target_moment = model["metrics"]["target_moment/she"]
        assert abs(target_moment["value"] - 0.5) < 4 * target_moment["standard_error"] + 0.05


def test_reward_run_reports_objective(tiny_suite):
    report = _run_tiny(tiny_suite, {"type": "reward", "reward": {"type": "vader"}, "beta": 0.5}, ["rlhf"])

    base = report["models"][0]["metrics"]
    assert base["kl_to_base"]["value"] == 0.0
    assert base["rlhf_objective"]["value"] == pytest.approx(base["reward"]["value"], abs=1e-12)
    for model in report["models"]:
        metrics = model["metrics"]
        objective = metrics["reward"]["value"] - 0.5 * metrics["kl_to_base"]["value"]
        assert metrics["rlhf_objective"]["value"] == pytest.approx(objective, abs=1e-9)
        assert metrics["target_reward"]["method"] == "self-normalized-importance-sampling+delta"

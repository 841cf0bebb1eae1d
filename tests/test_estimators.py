"""Estimators against exact values on discrete distributions sampled with numpy."""

import math

import numpy as np
import pytest

from fdiv_eval.divergences import DIVERGENCES
from fdiv_eval.errors import EstimationError
from fdiv_eval.estimates import (
    Estimate,
    effective_sample_size,
    mean_estimate,
    pareto_k,
    rate_estimate,
    wilson_interval,
)
from fdiv_eval.estimators import (
    forward_kl_from_base,
    log_partition,
    model_divergence,
    policy_divergence,
    require_finite_log_partition,
    reverse_kl_on_support,
)


def _exact(value: float) -> Estimate:
    return Estimate(value, 0.0, value, value, 1, "exact")


class DiscreteProblem:
    """A base π0, a policy π and a pointwise target P = π0·max(b, ε) on K outcomes."""

    def __init__(self, size=30, epsilon=0.0, seed=0):
        rng = np.random.default_rng(seed)
        self.base = rng.dirichlet(np.ones(size))
        self.policy = rng.dirichlet(np.ones(size) * 0.7)
        self.satisfied = np.zeros(size, dtype=bool)
        self.satisfied[: size // 3] = True
        self.potential = np.where(self.satisfied, 1.0, epsilon)
        unnormalized = self.base * self.potential
        self.partition = unnormalized.sum()
        self.target = unnormalized / self.partition
        with np.errstate(divide="ignore"):
            self.log_potential = np.log(self.potential)
            self.log_target_unnormalized = np.log(self.base) + self.log_potential

    def exact_divergence(self, name):
        divergence = DIVERGENCES[name]
        import torch

        with np.errstate(divide="ignore"):
            s = torch.tensor(np.log(self.policy) - np.log(self.target))
        return float((torch.tensor(self.policy) * divergence.policy_term(s)).sum())


def test_effective_sample_size_bounds_and_scale_invariance():
    rng = np.random.default_rng(0)
    log_weights = rng.normal(size=500) * 2
    ess = effective_sample_size(log_weights)
    assert 1.0 <= ess <= 500.0
    assert effective_sample_size(log_weights + 37.5) == pytest.approx(ess, rel=1e-12)
    assert effective_sample_size(np.zeros(40)) == pytest.approx(40.0)
    assert effective_sample_size(np.array([0.0, -math.inf, -math.inf])) == pytest.approx(1.0)


def test_effective_sample_size_closed_form():
    weights = np.array([1.0, 2.0, 3.0, 4.0])
    expected = weights.sum() ** 2 / (weights**2).sum()
    assert effective_sample_size(np.log(weights)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("shape", [0.3, 0.6, 1.0])
def test_pareto_k_recovers_tail_shape(shape):
    # Weights U^(−ξ) have a Pareto tail with shape ξ exactly.
    # One fit has a standard error near 0.06 here, so average 10 seeds.
    estimates = []
    for seed in range(10):
        log_weights = -shape * np.log(np.random.default_rng(seed).uniform(size=20000))
        estimates.append(pareto_k(log_weights))
    assert np.mean(estimates) == pytest.approx(shape, abs=0.05)


def test_wilson_interval_known_value():
    # 10 successes of 100: the Wilson 95% interval is [0.0552, 0.1744] (to 4 decimals).
    low, high = wilson_interval(10, 100)
    assert low == pytest.approx(0.0552, abs=1e-4)
    assert high == pytest.approx(0.1744, abs=1e-4)


def test_rate_estimate_zero_successes():
    estimate = rate_estimate(np.zeros(50, dtype=bool))
    assert estimate.value == 0.0
    assert estimate.ci_low == 0.0
    assert 0.05 < estimate.ci_high < 0.1


def test_mean_estimate_closed_form():
    terms = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    estimate = mean_estimate(terms)
    assert estimate.value == 3.0
    assert estimate.standard_error == pytest.approx(math.sqrt(2.5 / 5))
    assert estimate.ci_high - estimate.value == pytest.approx(1.959963984540054 * math.sqrt(0.5))


@pytest.mark.parametrize("epsilon", [0.0, 0.01])
def test_log_partition_for_pointwise_target(epsilon):
    log_potentials = np.where(np.arange(200) < 30, 0.0, math.log(epsilon) if epsilon else -math.inf)
    estimate = log_partition(log_potentials)
    assert estimate.value == pytest.approx(math.log(epsilon + (1 - epsilon) * 30 / 200), rel=1e-12)
    low, high = wilson_interval(30, 200)
    assert estimate.ci_low == pytest.approx(math.log(epsilon + (1 - epsilon) * low), rel=1e-12)
    assert estimate.ci_high == pytest.approx(math.log(epsilon + (1 - epsilon) * high), rel=1e-12)
    assert estimate.method == "acceptance-rate+wilson"


def test_log_partition_with_continuous_weights_matches_logmeanexp():
    rng = np.random.default_rng(2)
    log_potentials = rng.normal(size=1000)
    estimate = log_partition(log_potentials)
    assert estimate.value == pytest.approx(math.log(np.exp(log_potentials).mean()), rel=1e-12)
    ess = effective_sample_size(log_potentials)
    assert estimate.standard_error == pytest.approx(math.sqrt((1000 / ess - 1) / 1000), rel=1e-12)


def test_log_partition_without_acceptances_raises_when_required():
    estimate = log_partition(np.full(100, -math.inf))
    assert estimate.value == -math.inf
    assert math.isfinite(estimate.ci_high)
    with pytest.raises(EstimationError, match="none of the 100 base-model samples"):
        require_finite_log_partition(estimate, "draw more samples")


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_policy_divergence_matches_exact_value(name):
    problem = DiscreteProblem(epsilon=0.05, seed=3)
    rng = np.random.default_rng(4)
    draws = rng.choice(problem.base.size, size=20000, p=problem.policy)
    log_ratios = np.log(problem.policy[draws]) - problem.log_target_unnormalized[draws]
    estimate = policy_divergence(DIVERGENCES[name], log_ratios, _exact(math.log(problem.partition)))
    exact = problem.exact_divergence(name)
    # Five standard errors: a fixed seed, so this either always passes or always fails.
    assert abs(estimate.value - exact) < 5 * estimate.standard_error + 1e-12, (estimate, exact)


def test_policy_divergence_hard_constraint():
    problem = DiscreteProblem(epsilon=0.0, seed=5)
    rng = np.random.default_rng(6)
    draws = rng.choice(problem.base.size, size=500, p=problem.policy)
    with np.errstate(divide="ignore"):
        log_ratios = np.log(problem.policy[draws]) - problem.log_target_unnormalized[draws]
    estimate = policy_divergence(DIVERGENCES["reverse_kl"], log_ratios, _exact(math.log(problem.partition)))
    assert estimate.value == math.inf
    violations = int(np.count_nonzero(~problem.satisfied[draws]))
    assert estimate.notes == (f"{violations} of 500 samples have P(x) = 0, so the divergence is infinite",)
    for name in ("forward_kl", "js", "tv", "hellinger", "chi2_neyman"):
        finite = policy_divergence(DIVERGENCES[name], log_ratios, _exact(math.log(problem.partition)))
        assert math.isfinite(finite.value), name


def test_reverse_kl_on_support_matches_restricted_policy():
    problem = DiscreteProblem(epsilon=0.0, seed=7)
    rng = np.random.default_rng(8)
    draws = rng.choice(problem.base.size, size=40000, p=problem.policy)
    with np.errstate(divide="ignore"):
        log_ratios = np.log(problem.policy[draws]) - problem.log_target_unnormalized[draws]
    estimate = reverse_kl_on_support(log_ratios, _exact(math.log(problem.partition)))
    restricted = np.where(problem.satisfied, problem.policy, 0.0)
    restricted /= restricted.sum()
    inside = problem.satisfied
    exact = float((restricted[inside] * np.log(restricted[inside] / problem.target[inside])).sum())
    assert abs(estimate.value - exact) < 5 * estimate.standard_error, (estimate, exact)


def test_forward_kl_from_base_hard_constraint():
    # Hand-built: 4 base samples, 2 accepted; KL = mean over accepted of (log π0 − log π) − log Ẑ.
    log_potentials = np.array([0.0, -math.inf, 0.0, -math.inf])
    log_base_minus_log_policy = np.array([0.5, 9.0, -0.1, 9.0])
    estimate = forward_kl_from_base(log_potentials, log_base_minus_log_policy)
    assert estimate.value == pytest.approx((0.5 - 0.1) / 2 - math.log(0.5), rel=1e-12)


def test_forward_kl_from_base_matches_exact_value():
    problem = DiscreteProblem(epsilon=0.02, seed=9)
    rng = np.random.default_rng(10)
    draws = rng.choice(problem.base.size, size=40000, p=problem.base)
    estimate = forward_kl_from_base(
        problem.log_potential[draws], np.log(problem.base[draws]) - np.log(problem.policy[draws])
    )
    exact = problem.exact_divergence("forward_kl")
    assert abs(estimate.value - exact) < 5 * estimate.standard_error, (estimate, exact)


def test_model_divergence_from_either_side():
    rng = np.random.default_rng(11)
    first, second = rng.dirichlet(np.ones(20)), rng.dirichlet(np.ones(20))
    exact = float((first * np.log(first / second)).sum())  # KL(first‖second) = reverse_kl with π = first
    from_second = rng.choice(20, size=40000, p=second)
    from_first = rng.choice(20, size=40000, p=first)
    by_second = model_divergence(DIVERGENCES["reverse_kl"], np.log(first / second)[from_second], "b")
    by_first = model_divergence(DIVERGENCES["reverse_kl"], np.log(first / second)[from_first], "a")
    assert abs(by_second.value - exact) < 5 * by_second.standard_error
    assert abs(by_first.value - exact) < 5 * by_first.standard_error


def test_forward_kl_interval_coverage():
    # 300 independent repetitions of the full estimate (log Ẑ from its own base
    # sample, then the policy sample). Binomial(300, 0.95) lies in [0.92, 0.98]
    # with probability above 0.99; the seed makes the outcome fixed.
    problem = DiscreteProblem(epsilon=0.0, seed=12)
    exact = problem.exact_divergence("forward_kl")
    rng = np.random.default_rng(13)
    covered = 0
    repetitions = 300
    for _ in range(repetitions):
        base_draws = rng.choice(problem.base.size, size=2000, p=problem.base)
        log_z = log_partition(problem.log_potential[base_draws])
        draws = rng.choice(problem.base.size, size=2000, p=problem.policy)
        with np.errstate(divide="ignore"):
            log_ratios = np.log(problem.policy[draws]) - problem.log_target_unnormalized[draws]
        estimate = policy_divergence(DIVERGENCES["forward_kl"], log_ratios, log_z)
        covered += estimate.ci_low <= exact <= estimate.ci_high
    assert 0.92 <= covered / repetitions <= 0.98


def test_estimate_round_trips_through_json_encoding():
    estimate = Estimate(math.inf, 0.0, math.inf, math.inf, 10, "x", notes=("a",))
    data = estimate.to_dict()
    assert data["value"] == "inf"
    assert Estimate.from_dict(data) == estimate

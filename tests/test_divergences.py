"""f and f′ of every divergence against closed forms, finite differences and limits."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fdiv_eval.divergences import DIVERGENCES, alpha_divergence, get_divergence
from fdiv_eval.errors import InvalidInputError

T_VALUES = [1e-6, 0.01, 0.3, 0.9, 1.0, 1.7, 5.0, 250.0]


def _closed_form_f(name: str, t: float) -> float:
    # The formulas as usually written, in terms of t itself.
    if name == "forward_kl":
        return -math.log(t)
    if name == "reverse_kl":
        return t * math.log(t)
    if name == "js":
        return 0.5 * (t * math.log(t) - (1 + t) * math.log((1 + t) / 2))
    if name == "tv":
        return 0.5 * abs(t - 1)
    if name == "hellinger":
        return 0.5 * (math.sqrt(t) - 1) ** 2
    if name == "chi2_pearson":
        return (t - 1) ** 2
    if name == "chi2_neyman":
        return (t - 1) ** 2 / t
    raise KeyError(name)


def _closed_form_f_prime(name: str, t: float) -> float:
    if name == "forward_kl":
        return -1 / t
    if name == "reverse_kl":
        return math.log(t) + 1
    if name == "js":
        return 0.5 * math.log(2 * t / (1 + t))
    if name == "tv":
        return 0.5 * math.copysign(1.0, t - 1) if t != 1 else 0.0
    if name == "hellinger":
        return 0.5 * (1 - 1 / math.sqrt(t))
    if name == "chi2_pearson":
        return 2 * (t - 1)
    if name == "chi2_neyman":
        return 1 - 1 / t**2
    raise KeyError(name)


def _s(t: float) -> torch.Tensor:
    return torch.tensor([math.log(t)], dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("t", T_VALUES)
def test_f_matches_closed_form(name, t):
    divergence = DIVERGENCES[name]
    assert float(divergence.f(_s(t))) == pytest.approx(_closed_form_f(name, t), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("t", T_VALUES)
def test_f_prime_matches_closed_form(name, t):
    divergence = DIVERGENCES[name]
    assert float(divergence.f_prime(_s(t))) == pytest.approx(_closed_form_f_prime(name, t), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("t", [0.05, 0.5, 2.0, 7.0])
def test_f_prime_matches_finite_difference(name, t):
    divergence = DIVERGENCES[name]
    step = 1e-6 * t
    difference = (float(divergence.f(_s(t + step))) - float(divergence.f(_s(t - step)))) / (2 * step)
    # Central differences in float64 are good to about 1e-6 relative here.
    assert float(divergence.f_prime(_s(t))) == pytest.approx(difference, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_f_is_zero_at_one(name):
    assert float(DIVERGENCES[name].f(_s(1.0))) == pytest.approx(0.0, abs=1e-15)


# −f′(∞): the pseudo-reward of a sample outside a hard constraint.
PSEUDO_REWARD_AT_INFINITY = {
    "forward_kl": 0.0,
    "reverse_kl": -math.inf,
    "js": -0.5 * math.log(2),
    "tv": -0.5,
    "hellinger": -0.5,
    "chi2_pearson": -math.inf,
    "chi2_neyman": -1.0,
}


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_pseudo_reward_limit_at_infinity(name):
    divergence = DIVERGENCES[name]
    reward = float(divergence.pseudo_reward(torch.tensor([math.inf], dtype=torch.float64)))
    assert reward == PSEUDO_REWARD_AT_INFINITY[name]
    assert -divergence.f_prime_at_infinity == PSEUDO_REWARD_AT_INFINITY[name]


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_policy_term_infinite_exactly_when_f_prime_is(name):
    # TV and Hellinger use rewritten policy terms whose value at p = 0 differs
    # from f′(∞) while their expectation does not (checked below), so only
    # finiteness is compared here.
    divergence = DIVERGENCES[name]
    value = float(divergence.policy_term(torch.tensor([math.inf], dtype=torch.float64)))
    assert math.isinf(value) == math.isinf(divergence.f_prime_at_infinity)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_no_nan_at_extremes(name):
    divergence = DIVERGENCES[name]
    s = torch.tensor([-math.inf, -800.0, -50.0, 0.0, 50.0, 800.0, math.inf], dtype=torch.float64)
    for function in (divergence.f, divergence.f_prime, divergence.policy_term):
        assert not torch.isnan(function(s)).any(), function.__name__


def _random_pair(rng, size: int, zeros_in_p: int = 0):
    policy = rng.dirichlet(np.ones(size))
    target = rng.dirichlet(np.ones(size))
    target[:zeros_in_p] = 0.0
    return policy, target / target.sum()


def _exact_divergence(divergence, policy: np.ndarray, target: np.ndarray) -> float:
    """Σ_x p·f(π/p), with p·f(π/p) → π·f′(∞) where p = 0."""
    total = 0.0
    for pi, p in zip(policy, target):
        if p == 0.0:
            total += pi * divergence.f_prime_at_infinity if pi > 0 else 0.0
        else:
            log_t = math.log(pi) - math.log(p) if pi > 0 else -math.inf
            total += p * float(divergence.f(torch.tensor([log_t], dtype=torch.float64)))
    return total


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("zeros", [0, 2])
def test_policy_term_expectation_equals_divergence(name, zeros):
    divergence = DIVERGENCES[name]
    policy, target = _random_pair(np.random.default_rng(7), 12, zeros_in_p=zeros)
    with np.errstate(divide="ignore"):
        s = torch.tensor(np.log(policy) - np.log(target))
    expectation = float((torch.tensor(policy) * divergence.policy_term(s)).sum())
    exact = _exact_divergence(divergence, policy, target)
    if math.isinf(exact):
        assert expectation == exact
    else:
        assert expectation == pytest.approx(exact, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_divergence_of_distribution_to_itself_is_zero(name):
    policy, _ = _random_pair(np.random.default_rng(3), 20)
    assert _exact_divergence(DIVERGENCES[name], policy, policy) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    policy=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=8),
    target=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=8),
)
def test_bounded_divergences_stay_in_range(policy, target):
    size = min(len(policy), len(target))
    policy, target = np.asarray(policy[:size]), np.asarray(target[:size])
    # p·f(π/p) overflows in float64 once π/p passes about 1e308; such tiny
    # masses are set to exact zeros, which the limit handles.
    policy[policy < 1e-12] = 0.0
    target[target < 1e-12] = 0.0
    if policy.sum() <= 0 or target.sum() <= 0:
        return
    policy, target = policy / policy.sum(), target / target.sum()
    for name, upper in (("js", math.log(2)), ("tv", 1.0), ("hellinger", 1.0)):
        value = _exact_divergence(DIVERGENCES[name], policy, target)
        assert -1e-12 <= value <= upper + 1e-12, (name, value)
    # TV and Hellinger against their textbook forms.
    assert _exact_divergence(DIVERGENCES["tv"], policy, target) == pytest.approx(
        0.5 * np.abs(policy - target).sum(), abs=1e-9
    )
    assert _exact_divergence(DIVERGENCES["hellinger"], policy, target) == pytest.approx(
        1 - np.sqrt(policy * target).sum(), abs=1e-9
    )


def test_alpha_divergence_tends_to_kl_endpoints():
    policy, target = _random_pair(np.random.default_rng(11), 10)
    reverse = _exact_divergence(DIVERGENCES["reverse_kl"], policy, target)
    forward = _exact_divergence(DIVERGENCES["forward_kl"], policy, target)
    assert _exact_divergence(alpha_divergence(1 - 1e-6), policy, target) == pytest.approx(reverse, rel=1e-4)
    assert _exact_divergence(alpha_divergence(1e-6), policy, target) == pytest.approx(forward, rel=1e-4)


def test_alpha_half_is_four_times_hellinger():
    policy, target = _random_pair(np.random.default_rng(5), 10)
    hellinger = _exact_divergence(DIVERGENCES["hellinger"], policy, target)
    assert _exact_divergence(alpha_divergence(0.5), policy, target) == pytest.approx(4 * hellinger, rel=1e-9)


def test_presets_resolve():
    assert get_divergence("rlhf").name == "reverse_kl"
    assert get_divergence("gdc").name == "forward_kl"
    assert get_divergence("alpha", alpha=0.5).name == "alpha"


def test_needs_full_support():
    assert get_divergence("rlhf").needs_full_support
    assert get_divergence("chi2_pearson").needs_full_support
    assert not get_divergence("gdc").needs_full_support
    assert not get_divergence("js").needs_full_support
    assert not get_divergence("alpha", alpha=0.5).needs_full_support
    assert get_divergence("alpha", alpha=2.0).needs_full_support


def test_unknown_divergence_is_rejected():
    with pytest.raises(InvalidInputError, match="unknown divergence or method 'kl2'"):
        get_divergence("kl2")


def test_alpha_without_value_is_rejected():
    with pytest.raises(InvalidInputError, match="needs a value for alpha"):
        get_divergence("alpha")


@pytest.mark.parametrize("alpha", [0.0, 1.0, math.nan])
def test_alpha_endpoints_are_rejected(alpha):
    with pytest.raises(InvalidInputError, match="alpha must be a finite number"):
        alpha_divergence(alpha)

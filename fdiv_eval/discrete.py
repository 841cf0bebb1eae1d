"""f-divergences between two explicit discrete distributions.

Natural logs, so every value is in nats unless a ``base`` is given. Every
function takes its distributions as keyword-only arguments, because a
swapped direction (KL(p‖q) for KL(q‖p)) gives a plausible wrong number and
no error. The first argument of D(·‖·) is always ``p`` (or ``policy``).

Conventions: JS is the divergence, not the distance (its square root, see
``js_distance``); total variation carries the ½ factor and is half the L1
distance; Pearson χ²(p‖q) = Σ(p − q)²/q and Neyman χ²(p‖q) = Σ(p − q)²/p.
"""

from __future__ import annotations

import math

import torch

from fdiv_eval.divergences import FDivergence, get_divergence
from fdiv_eval.errors import InvalidInputError

PROBABILITY_TOLERANCE = 1e-6
"""How far from 1 the sum of a probability vector may be."""


def _probabilities(name: str, values) -> torch.Tensor:
    """Return ``values`` as a float64 tensor after checking that they form a distribution."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    tensor = tensor.double()
    if tensor.ndim != 1 or tensor.numel() == 0:
        raise InvalidInputError(f"{name} must be a non-empty 1-D probability vector, got shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
        raise InvalidInputError(f"{name} must hold finite non-negative probabilities, got {tensor.tolist()}")
    total = float(tensor.detach().sum())
    if abs(total - 1.0) > PROBABILITY_TOLERANCE:
        raise InvalidInputError(f"{name} must sum to 1, got a sum of {total:.9g}; normalize it first")
    return tensor


def f_divergence(divergence: FDivergence | str, *, policy, target) -> torch.Tensor:
    """Return D_f(policy‖target) = Σ target·f(policy/target) as a float64 scalar tensor.

    ``divergence`` is an ``FDivergence`` or a name or preset (``rlhf`` is
    reverse KL, KL(policy‖target); ``gdc`` is forward KL, KL(target‖policy)).
    Where the target is 0 and the policy is not, the term is
    policy·f′(∞), the limit of target·f(policy/target). Gradients flow to
    ``policy`` when it requires them.
    """
    if isinstance(divergence, str):
        divergence = get_divergence(divergence)
    policy, target = _distribution_pair(policy, target, ("policy", "target"))
    return _f_divergence(divergence, policy, target)


def _distribution_pair(first, second, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two probability vectors over the same outcomes; ``names`` are the caller's argument names."""
    first = _probabilities(names[0], first)
    second = _probabilities(names[1], second)
    if first.shape != second.shape:
        raise InvalidInputError(
            f"{names[0]} has {first.numel()} outcomes and {names[1]} has {second.numel()}; "
            "give both over the same outcomes"
        )
    return first, second


def _f_divergence(divergence: FDivergence, policy: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target_positive = target > 0
    policy_positive = policy > 0
    # Replace zeros by 1 inside the logs, so that no NaN or inf reaches the
    # gradient through the branch that torch.where does not select.
    safe_target = torch.where(target_positive, target, torch.ones_like(target))
    safe_policy = torch.where(policy_positive, policy, torch.ones_like(policy))
    log_ratio = torch.where(
        policy_positive, torch.log(safe_policy), torch.full_like(policy, -math.inf)
    ) - torch.log(safe_target)
    on_support = target * divergence.f(torch.where(target_positive, log_ratio, torch.zeros_like(log_ratio)))
    off_support = policy * divergence.f_prime_at_infinity if math.isfinite(divergence.f_prime_at_infinity) else (
        torch.where(policy_positive, torch.full_like(policy, math.inf), torch.zeros_like(policy))
    )
    zero = torch.zeros((), dtype=torch.float64)
    terms = torch.where(target_positive, on_support, torch.where(policy_positive, off_support, zero))
    return terms.sum()


def kl_divergence(*, p, q) -> float:
    """Return KL(p‖q) = Σ p·log(p/q) in nats; +∞ when p has mass where q has none."""
    return float(_f_divergence(get_divergence("reverse_kl"), *_distribution_pair(p, q, ("p", "q"))))


def pearson_chi2_divergence(*, p, q) -> float:
    """Return Pearson χ²(p‖q) = Σ (p − q)²/q."""
    return float(_f_divergence(get_divergence("chi2_pearson"), *_distribution_pair(p, q, ("p", "q"))))


def neyman_chi2_divergence(*, p, q) -> float:
    """Return Neyman χ²(p‖q) = Σ (p − q)²/p, which is Pearson χ²(q‖p)."""
    return float(_f_divergence(get_divergence("chi2_neyman"), *_distribution_pair(p, q, ("p", "q"))))


def js_divergence(*, p, q, base: float = math.e) -> float:
    """Return the Jensen–Shannon divergence ½KL(p‖m) + ½KL(q‖m), m = (p + q)/2.

    In nats by default (at most log 2); ``base=2`` gives bits (at most 1).
    This is the divergence, not the distance: see ``js_distance``.
    """
    return float(_f_divergence(get_divergence("js"), *_distribution_pair(p, q, ("p", "q")))) / _log_base(base)


def js_distance(*, p, q, base: float = math.e) -> float:
    """Return the Jensen–Shannon distance, the square root of ``js_divergence`` (a metric)."""
    return math.sqrt(js_divergence(p=p, q=q, base=base))


def total_variation_distance(*, p, q) -> float:
    """Return TV(p, q) = ½·Σ|p − q|, in [0, 1]; half of ``l1_distance``."""
    return float(_f_divergence(get_divergence("tv"), *_distribution_pair(p, q, ("p", "q"))))


def l1_distance(*, p, q) -> float:
    """Return Σ|p − q|, in [0, 2]; twice the total variation distance."""
    p, q = _distribution_pair(p, q, ("p", "q"))
    return float((p - q).abs().sum())


def _log_base(base: float) -> float:
    if not (base > 0 and base != 1 and math.isfinite(base)):
        raise InvalidInputError(f"base must be a positive number other than 1, got {base!r}; use math.e for nats or 2 for bits")
    return math.log(base)

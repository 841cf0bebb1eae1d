"""f-divergences D_f(π‖p) = E_p[f(π/p)], computed from log-ratios.

All logarithms are natural and every divergence is in nats. Write t = π(x)/p(x)
and s = log t. Each divergence supplies, as functions of s:

- ``f(s)``: the generator f(t), convex with f(1) = 0;
- ``f_prime(s)``: its derivative f′(t), whose negative is the f-DPG
  pseudo-reward;
- ``policy_term(s)``: a function whose expectation under π equals D_f(π‖p).
  It is f(t)/t = u·f(1/u) with u = p/π = 1/t, sometimes rewritten to a
  lower-variance form with the same expectation;
- ``f_prime_at_infinity``: lim f′(t) as t → ∞. A sample with p = 0 adds
  π·f′(∞) to D_f, because p·f(π/p) → π·f′(∞) as p → 0, so D_f is infinite
  for a policy with mass outside the target's support exactly when this is.

Working in s keeps the limits exact: s = +∞ (the target gives the sample no
mass) and s = −∞ (the policy gives it none) return the limiting values, never
NaN. Inputs are float64 tensors of any shape; outputs have the same shape.

Conventions: Jensen–Shannon is the divergence (no square root), total variation
carries the ½ factor, and Hellinger is the squared Hellinger distance
1 − Σ√(π·p).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fdiv_eval.errors import InvalidInputError

Tensor = torch.Tensor
LOG_2 = math.log(2.0)


def _where_infinite(s: Tensor, values: Tensor, at_plus_inf: float, at_minus_inf: float) -> Tensor:
    """Replace entries where s = ±∞ by the given limits."""
    values = torch.where(s == math.inf, torch.full_like(values, at_plus_inf), values)
    return torch.where(s == -math.inf, torch.full_like(values, at_minus_inf), values)


@dataclass(frozen=True)
class FDivergence:
    """One member of the f-divergence family, as functions of s = log(π/p)."""

    name: str
    description: str
    f: Callable[[Tensor], Tensor]
    f_prime: Callable[[Tensor], Tensor]
    policy_term: Callable[[Tensor], Tensor]
    f_prime_at_infinity: float
    upper_bound: float
    """Largest possible value: log 2 for JS, 1 for TV and Hellinger, ∞ otherwise."""

    def pseudo_reward(self, log_ratio: Tensor) -> Tensor:
        """Return −f′(π/p), the f-DPG pseudo-reward, from s = log π − log p."""
        return -self.f_prime(log_ratio)

    @property
    def needs_full_support(self) -> bool:
        """Whether the divergence is infinite for a policy with mass where p = 0.

        Training such a divergence toward a hard constraint needs ε > 0,
        because a sample outside the constraint has pseudo-reward −∞.
        """
        return math.isinf(self.f_prime_at_infinity)


# Forward KL(p‖π): f(t) = −log t.


def _forward_kl_f(s: Tensor) -> Tensor:
    return -s


def _forward_kl_f_prime(s: Tensor) -> Tensor:
    return -torch.exp(-s)


def _forward_kl_policy_term(s: Tensor) -> Tensor:
    # u·log u with log u = −s; u = 0 (s = +∞) contributes 0.
    values = -s * torch.exp(-s)
    return _where_infinite(s, values, 0.0, math.inf)


# Reverse KL(π‖p): f(t) = t·log t.


def _reverse_kl_f(s: Tensor) -> Tensor:
    values = torch.exp(s) * s
    return _where_infinite(s, values, math.inf, 0.0)


def _reverse_kl_f_prime(s: Tensor) -> Tensor:
    return s + 1.0


def _reverse_kl_policy_term(s: Tensor) -> Tensor:
    return s.clone()


# Jensen–Shannon: f(t) = ½[t·log(2t/(1+t)) + log(2/(1+t))].
# log(2t/(1+t)) = log 2 − softplus(−s) and log(2/(1+t)) = log 2 − softplus(s).


def _js_f(s: Tensor) -> Tensor:
    t = torch.exp(s)
    values = 0.5 * (t * (LOG_2 - torch.nn.functional.softplus(-s)) + LOG_2 - torch.nn.functional.softplus(s))
    return _where_infinite(s, values, math.inf, 0.5 * LOG_2)


def _js_f_prime(s: Tensor) -> Tensor:
    return 0.5 * (LOG_2 - torch.nn.functional.softplus(-s))


def _js_policy_term(s: Tensor) -> Tensor:
    values = 0.5 * (
        LOG_2 - torch.nn.functional.softplus(-s) + torch.exp(-s) * (LOG_2 - torch.nn.functional.softplus(s))
    )
    return _where_infinite(s, values, 0.5 * LOG_2, math.inf)


# Total variation: f(t) = ½|t − 1|.


def _tv_f(s: Tensor) -> Tensor:
    return _where_infinite(s, 0.5 * torch.expm1(s).abs(), math.inf, 0.5)


def _tv_f_prime(s: Tensor) -> Tensor:
    return 0.5 * torch.sign(s)


def _tv_policy_term(s: Tensor) -> Tensor:
    # E_π[½|1 − u|] = E_π[(1 − u)₊] because E_π[u] = Σp = 1, and the second
    # form is bounded in [0, 1], so its sample mean has lower variance.
    return torch.clamp(-torch.expm1(-s), min=0.0)


# Squared Hellinger: f(t) = ½(√t − 1)².


def _hellinger_f(s: Tensor) -> Tensor:
    return _where_infinite(s, 0.5 * torch.expm1(0.5 * s) ** 2, math.inf, 0.5)


def _hellinger_f_prime(s: Tensor) -> Tensor:
    return 0.5 * (1.0 - torch.exp(-0.5 * s))


def _hellinger_policy_term(s: Tensor) -> Tensor:
    # E_π[½(1 − √u)²] = 1 − E_π[√u] because E_π[u] = 1; the second form is bounded.
    return -torch.expm1(-0.5 * s)


# Pearson χ²(π‖p): f(t) = (t − 1)².


def _pearson_f(s: Tensor) -> Tensor:
    return _where_infinite(s, torch.expm1(s) ** 2, math.inf, 1.0)


def _pearson_f_prime(s: Tensor) -> Tensor:
    return 2.0 * torch.expm1(s)


def _pearson_policy_term(s: Tensor) -> Tensor:
    # (t − 1)²/t = t − 2 + 1/t
    return _where_infinite(s, 2.0 * (torch.cosh(s) - 1.0), math.inf, math.inf)


# Neyman χ²(p‖π): f(t) = (t − 1)²/t.


def _neyman_f(s: Tensor) -> Tensor:
    return _where_infinite(s, 2.0 * (torch.cosh(s) - 1.0), math.inf, math.inf)


def _neyman_f_prime(s: Tensor) -> Tensor:
    return -torch.expm1(-2.0 * s)


def _neyman_policy_term(s: Tensor) -> Tensor:
    # (t − 1)²/t² = (1 − u)²
    return _where_infinite(s, torch.expm1(-s) ** 2, 1.0, math.inf)


def alpha_divergence(alpha: float) -> FDivergence:
    """Return the Amari α-divergence, f(t) = (t^α − α·t − (1 − α))/(α(α − 1)).

    α → 1 gives reverse KL and α → 0 gives forward KL; those two endpoints are
    rejected here, so use ``reverse_kl`` or ``forward_kl`` for them.
    """
    if not math.isfinite(alpha) or alpha in (0.0, 1.0):
        raise InvalidInputError(
            f"alpha must be a finite number other than 0 and 1, got {alpha!r}; "
            "use forward_kl for alpha = 0 and reverse_kl for alpha = 1"
        )
    scale = alpha * (alpha - 1.0)

    def f(s: Tensor) -> Tensor:
        values = (torch.exp(alpha * s) - alpha * torch.exp(s) - (1.0 - alpha)) / scale
        at_zero = -(1.0 - alpha) / scale if alpha > 0 else math.inf
        return _where_infinite(s, values, math.inf, at_zero)

    def f_prime(s: Tensor) -> Tensor:
        return torch.expm1((alpha - 1.0) * s) / (alpha - 1.0)

    f_prime_at_infinity = 1.0 / (1.0 - alpha) if alpha < 1 else math.inf

    def policy_term(s: Tensor) -> Tensor:
        values = (torch.exp((alpha - 1.0) * s) - alpha - (1.0 - alpha) * torch.exp(-s)) / scale
        at_minus_inf = math.inf
        return _where_infinite(s, values, f_prime_at_infinity, at_minus_inf)

    return FDivergence(
        name="alpha",
        description=f"Amari alpha-divergence, alpha = {alpha:g}",
        f=f,
        f_prime=f_prime,
        policy_term=policy_term,
        f_prime_at_infinity=f_prime_at_infinity,
        upper_bound=math.inf,
    )


DIVERGENCES: dict[str, FDivergence] = {
    "forward_kl": FDivergence(
        "forward_kl", "KL(p‖π), the GDC/DPG objective", _forward_kl_f, _forward_kl_f_prime,
        _forward_kl_policy_term, 0.0, math.inf,
    ),
    "reverse_kl": FDivergence(
        "reverse_kl", "KL(π‖p), the RLHF objective", _reverse_kl_f, _reverse_kl_f_prime,
        _reverse_kl_policy_term, math.inf, math.inf,
    ),
    "js": FDivergence(
        "js", "Jensen–Shannon divergence (not the distance)", _js_f, _js_f_prime,
        _js_policy_term, 0.5 * LOG_2, LOG_2,
    ),
    "tv": FDivergence(
        "tv", "total variation, ½·Σ|π − p|", _tv_f, _tv_f_prime, _tv_policy_term, 0.5, 1.0,
    ),
    "hellinger": FDivergence(
        "hellinger", "squared Hellinger distance, 1 − Σ√(π·p)", _hellinger_f, _hellinger_f_prime,
        _hellinger_policy_term, 0.5, 1.0,
    ),
    "chi2_pearson": FDivergence(
        "chi2_pearson", "Pearson χ²(π‖p)", _pearson_f, _pearson_f_prime, _pearson_policy_term,
        math.inf, math.inf,
    ),
    "chi2_neyman": FDivergence(
        "chi2_neyman", "Neyman χ²(p‖π)", _neyman_f, _neyman_f_prime, _neyman_policy_term,
        1.0, math.inf,
    ),
}

PRESETS = {"rlhf": "reverse_kl", "gdc": "forward_kl"}
"""Training method names that stand for a divergence."""


def get_divergence(name: str, alpha: float | None = None) -> FDivergence:
    """Look up a divergence by name or preset (``rlhf``, ``gdc``); ``alpha`` needs ``alpha``."""
    resolved = PRESETS.get(name, name)
    if resolved == "alpha":
        if alpha is None:
            raise InvalidInputError("divergence 'alpha' needs a value for alpha, for example --alpha 0.5")
        return alpha_divergence(alpha)
    if resolved not in DIVERGENCES:
        known = ", ".join(sorted([*DIVERGENCES, *PRESETS, "alpha"]))
        raise InvalidInputError(f"unknown divergence or method {name!r}; choose one of: {known}")
    return DIVERGENCES[resolved]

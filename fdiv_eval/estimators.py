"""Estimators of log Z, divergences to the target and KL to the base model.

Natural logs, nats. Samples x_i come from a proposal q. Every input here is a
float64 array of per-sample log quantities, so the functions know nothing of
models or tokens and tests can feed them closed-form cases.

Two independent samples enter the divergence estimates: a base-model sample
(q = π0), which gives log Ẑ, and a policy sample (q = π), which gives the
expectation. The standard errors of the composites add both variances by the
delta method: se² = Var(term)/n + (∂D/∂log Z)²·se(log Ẑ)².
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from fdiv_eval.divergences import FDivergence
from fdiv_eval.errors import EstimationError, InvalidInputError
from fdiv_eval.estimates import (
    Z_95,
    Estimate,
    constant_estimate,
    effective_sample_size,
    log_sum_exp,
    mean_estimate,
    normal_estimate,
    pareto_k,
    rate_estimate,
    self_normalized_weights,
    wilson_interval,
)


def _as_float64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _binary_level(log_potentials: np.ndarray) -> float | None:
    """Return log ε when every potential is 0 (accepted) or one common log ε < 0, else None."""
    rejected = log_potentials[log_potentials != 0.0]
    if rejected.size == 0:
        return -math.inf
    level = rejected[0]
    if np.all(rejected == level) and level < 0:
        return float(level)
    return None


def log_partition(log_potentials) -> Estimate:
    """Estimate log Z from a base-model sample.

    ``log_potentials`` contains log P(x_i) − log π0(x_i) for x_i ∼ π0, so that
    Ẑ = mean(exp(·)) is unbiased for Z and log Ẑ = logsumexp − log n.

    For a pointwise target, whose potentials take only the values 1 and ε,
    Z = ε + (1 − ε)·a with a the acceptance rate, and the interval maps the
    Wilson interval of a, which stays valid with zero acceptances: then the
    value is log ε (−∞ when ε = 0) and ``ci_high`` is the upper bound.
    Otherwise se(log Ẑ)² = (n/ESS − 1)/n (delta method) with a normal
    interval on the log scale.
    """
    log_potentials = _as_float64(log_potentials)
    n = log_potentials.size
    if n == 0:
        raise EstimationError("log Z needs at least one base-model sample; set audit.base_samples above 0")
    ess = effective_sample_size(log_potentials)
    level = _binary_level(log_potentials)
    if level is not None:
        epsilon = math.exp(level)
        accepted = int(np.count_nonzero(log_potentials == 0.0))
        rate = accepted / n
        low, high = wilson_interval(accepted, n)

        def to_log_z(a: float) -> float:
            z = epsilon + (1.0 - epsilon) * a
            return math.log(z) if z > 0 else -math.inf

        value = to_log_z(rate)
        if accepted in (0, n):
            standard_error = math.nan
        else:
            standard_error = (1.0 - epsilon) * math.sqrt(rate * (1 - rate) / n) / (epsilon + (1 - epsilon) * rate)
        return Estimate(
            value, standard_error, to_log_z(low), to_log_z(high), n, "acceptance-rate+wilson",
            effective_sample_size=ess,
        )

    value = log_sum_exp(log_potentials) - math.log(n)
    standard_error = math.sqrt(max(n / ess - 1.0, 0.0) / n)
    return normal_estimate(
        value, standard_error, n, "importance-sampling+delta",
        effective_sample_size=ess, pareto_k=pareto_k(log_potentials),
    )


def require_finite_log_partition(estimate: Estimate, hint: str) -> None:
    """Raise EstimationError when log Ẑ = −∞, meaning no base sample had P > 0."""
    if estimate.value == -math.inf:
        upper = math.exp(estimate.ci_high) if math.isfinite(estimate.ci_high) else math.nan
        raise EstimationError(
            f"log Z cannot be estimated: none of the {estimate.n} base-model samples has P(x) > 0 "
            f"(95% upper bound on Z: {upper:.3g}); {hint}"
        )


def require_accepted_samples(satisfied: np.ndarray, words, hint: str) -> None:
    """Raise EstimationError when no base sample satisfies the constraint.

    With ε > 0, Ẑ would still be finite (ε), but every estimate that depends
    on the target would rest on no sample from its support.
    """
    satisfied = np.asarray(satisfied, dtype=bool)
    if not satisfied.any():
        wanted = f"contains any of the target words {list(words)}" if isinstance(words, (list, tuple)) \
            else f"satisfies the target constraint {words}"
        raise EstimationError(
            f"log Z cannot be estimated: none of the {satisfied.size} base-model samples {wanted}; {hint}"
        )


def _log_z_standard_error(log_z: Estimate) -> float:
    se = log_z.standard_error
    if math.isnan(se):
        # All or none of the base samples were accepted: take the half-width of
        # the finite side of the Wilson interval as a conservative stand-in.
        widths = [abs(bound - log_z.value) for bound in (log_z.ci_low, log_z.ci_high) if math.isfinite(bound)]
        se = max(widths) / Z_95 if widths else 0.0
    return se


def policy_divergence(divergence: FDivergence, log_ratios, log_z: Estimate) -> Estimate:
    """Estimate D_f(π‖p) from policy samples, p = P/Z.

    ``log_ratios`` contains log π(x_i) − log P(x_i) for x_i ∼ π. With
    s_i = log_ratios_i + log Ẑ and u_i = exp(−s_i) = p/π, the estimate is
    mean(policy_term(s_i)), whose expectation is D_f(π‖p). A sample with
    P = 0 contributes f′(∞), so the value is +∞ for reverse KL and Pearson χ²
    when any sample violates a hard constraint.

    The ESS and Pareto k̂ describe the importance weights u_i. The standard
    error includes the uncertainty of log Ẑ by the delta method.
    """
    log_ratios = _as_float64(log_ratios)
    n = log_ratios.size
    shifted = torch.tensor(log_ratios + log_z.value, dtype=torch.float64, requires_grad=True)
    terms = divergence.policy_term(shifted)
    log_weights = -shifted.detach().numpy()
    ess = effective_sample_size(log_weights)
    k_hat = pareto_k(log_weights)
    method = f"policy-sample+delta({divergence.policy_term.__name__.strip('_')})"

    values = terms.detach().numpy()
    if np.isinf(values).any():
        violations = int(np.count_nonzero(np.isposinf(log_ratios)))
        estimate = constant_estimate(math.inf, n, method)
        note = f"{violations} of {n} samples have P(x) = 0, so the divergence is infinite"
        return Estimate(**{**estimate.__dict__, "effective_sample_size": ess, "pareto_k": k_hat}).with_notes(note)

    terms.sum().backward()
    # A sample with P = 0 (s = +∞) contributes the constant f′(∞), whose
    # derivative in log Z is 0; autograd would give NaN there.
    gradients = torch.where(torch.isfinite(shifted.detach()), shifted.grad, torch.zeros_like(shifted.grad))
    derivative = float(gradients.mean())
    sample_variance = float(values.var(ddof=1)) / n if n > 1 else math.nan
    standard_error = math.sqrt(sample_variance + (derivative * _log_z_standard_error(log_z)) ** 2)
    value = float(values.mean())
    low = max(value - Z_95 * standard_error, 0.0)
    high = min(value + Z_95 * standard_error, divergence.upper_bound)
    return Estimate(value, standard_error, low, high, n, method, effective_sample_size=ess, pareto_k=k_hat)


def reverse_kl_on_support(log_ratios, log_z: Estimate) -> Estimate:
    """Estimate KL(π_S‖p) for π restricted to the support S = {P > 0} of p.

    π_S = π·1_S/π(S), so KL(π_S‖p) = E_{π_S}[log π − log P] + log Z − log π(S),
    with π(S) the fraction of policy samples in S. Equals the reverse KL when no
    sample violates the constraint.
    """
    log_ratios = _as_float64(log_ratios)
    inside = np.isfinite(log_ratios)
    n_inside = int(inside.sum())
    method = "policy-sample-on-support+delta"
    if n_inside == 0:
        return Estimate(math.nan, math.nan, math.nan, math.nan, log_ratios.size, method).with_notes(
            "no policy sample lies in the support of the target"
        )
    fraction = n_inside / log_ratios.size
    inner = mean_estimate(log_ratios[inside])
    value = inner.value + log_z.value - math.log(fraction)
    fraction_variance = (1 - fraction) / (fraction * log_ratios.size)
    standard_error = math.sqrt(
        (inner.standard_error if n_inside > 1 else 0.0) ** 2 + _log_z_standard_error(log_z) ** 2 + fraction_variance
    )
    return normal_estimate(value, standard_error, log_ratios.size, method)


def delta_method(columns: np.ndarray, function: Callable[[torch.Tensor], torch.Tensor], method: str) -> Estimate:
    """Estimate function(E[columns]) with a delta-method standard error.

    ``columns`` has shape [n, k]; the sample means feed ``function`` (a torch
    function of a length-k float64 tensor), and se² = ∇gᵀ·Cov/n·∇g.
    """
    columns = np.asarray(columns, dtype=np.float64)
    n = columns.shape[0]
    means = torch.tensor(columns.mean(axis=0), requires_grad=True)
    value = function(means)
    value.backward()
    gradient = means.grad.numpy()
    covariance = np.atleast_2d(np.cov(columns, rowvar=False)) / n
    standard_error = math.sqrt(max(float(gradient @ covariance @ gradient), 0.0))
    return normal_estimate(float(value.detach()), standard_error, n, method)


def forward_kl_from_base(log_potentials, log_base_minus_log_policy) -> Estimate:
    """Estimate KL(p‖π) from the base-model sample alone, as a cross-check.

    With w_i = P/π0 on x_i ∼ π0, KL(p‖π) = E_π0[w·(log P − log π)]/Z − log Z,
    and Ẑ = mean(w) comes from the same sample (a self-normalized ratio
    estimator). For a pointwise target with ε = 0 this is the mean over the
    accepted samples, which are exact draws from p, of log π0 − log π, minus
    log Ẑ: no importance weights are involved.
    """
    log_potentials = _as_float64(log_potentials)
    log_base_minus_log_policy = _as_float64(log_base_minus_log_policy)
    shift = float(log_potentials.max())
    if shift == -math.inf:
        return Estimate(math.nan, math.nan, math.nan, math.nan, log_potentials.size, "base-sample-ratio+delta")
    scaled = np.exp(log_potentials - shift)
    # log P − log π = log w + log π0 − log π; a term with w = 0 contributes 0.
    log_gap = np.where(scaled > 0, log_potentials + log_base_minus_log_policy, 0.0)
    columns = np.stack([scaled * log_gap, scaled], axis=1)

    def kl(means: torch.Tensor) -> torch.Tensor:
        return means[0] / means[1] - torch.log(means[1]) - shift

    estimate = delta_method(columns, kl, "base-sample-ratio+delta")
    log_weights = log_potentials
    return Estimate(
        **{**estimate.__dict__, "effective_sample_size": effective_sample_size(log_weights),
           "pareto_k": pareto_k(log_weights)}
    )


def model_divergence(divergence: FDivergence, log_ratios, sampled_from: str) -> Estimate:
    """Estimate D_f(π_a‖π_b) between two normalized models.

    ``log_ratios`` contains log π_a(x) − log π_b(x). With samples from π_b
    (``sampled_from="b"``) the estimate is mean f(t); with samples from π_a
    (``"a"``) it is mean f(t)/t, the policy term. No partition function enters.
    """
    log_ratios = torch.tensor(_as_float64(log_ratios))
    if sampled_from == "b":
        terms = divergence.f(log_ratios)
    elif sampled_from == "a":
        terms = divergence.policy_term(log_ratios)
    else:
        raise ValueError(f"sampled_from must be 'a' or 'b', got {sampled_from!r}")
    estimate = mean_estimate(terms.numpy(), method=f"samples-of-{sampled_from}+clt")
    return Estimate(
        **{**estimate.__dict__, "ci_low": max(estimate.ci_low, 0.0),
           "ci_high": min(estimate.ci_high, divergence.upper_bound)}
    )


def constraint_satisfaction(indicators) -> Estimate:
    """E_π[b] for a boolean feature b, with a Wilson interval."""
    return rate_estimate(indicators)


KL_ESTIMATORS = ("plain", "k3")
"""Per-sample forms of KL(π‖π0) under x ∼ π: ``plain`` is log π − log π0, ``k3`` is r − 1 − log r with r = π0/π."""


def kl_terms(log_policy, log_base, estimator: str) -> np.ndarray:
    """Return per-sample terms whose expectation under x ∼ π is KL(π‖π0).

    With r = π0(x)/π(x): ``plain`` is −log r, which is negative for every
    sample that π0 favours, and ``k3`` is r − 1 − log r ≥ 0, with the same
    expectation because E_π[r] = 1. Both need x drawn from π itself.
    """
    if estimator not in KL_ESTIMATORS:
        raise InvalidInputError(f"unknown KL estimator {estimator!r}; choose one of: {', '.join(KL_ESTIMATORS)}")
    log_r = _as_float64(log_base) - _as_float64(log_policy)
    if estimator == "plain":
        return -log_r
    # expm1 keeps r − 1 − log r accurate (and ≥ 0) when r is close to 1.
    return np.expm1(log_r) - log_r


def mean_over_sequences(values, lengths, method: str = "mean+clt") -> Estimate:
    """Average per-sequence values over the sequences that have at least one generated token.

    A sequence of length 0 has no token to score, so its value (0 from an
    empty masked sum) carries no information about the model: it is left out of the
    mean and counted in a note, and ``n`` is the number of sequences kept.
    """
    values = _as_float64(values)
    lengths = np.asarray(lengths).reshape(-1)
    if values.size != lengths.size:
        raise InvalidInputError(f"got {values.size} values and {lengths.size} lengths; give one length per value")
    kept = lengths > 0
    estimate = mean_estimate(values[kept], method=method)
    excluded = int(values.size - kept.sum())
    if excluded:
        estimate = estimate.with_notes(f"{excluded} of {values.size} sequences have no generated token and are excluded")
    return estimate


def kl_to_base(log_policy, log_base, estimator: str = "plain", log_proposal=None, lengths=None) -> Estimate:
    """Estimate the sequence-level KL(π‖π0) from scored samples.

    Without ``log_proposal`` the samples must come from π, and the value is
    the mean of ``kl_terms``. With ``log_proposal`` (log q of each sample
    under the distribution that drew it), the terms are reweighted by
    self-normalized importance weights π/q, which is consistent whenever q
    puts mass wherever π does. A proposal that misses part of π's support
    (greedy decoding, top-k) cannot be corrected by any weights.
    ``lengths`` excludes sequences with no generated token.
    """
    terms = kl_terms(log_policy, log_base, estimator)
    keep = np.ones(terms.size, dtype=bool) if lengths is None else np.asarray(lengths).reshape(-1) > 0
    if log_proposal is None:
        if lengths is None:
            return mean_estimate(terms, method=f"kl-{estimator}+clt")
        return mean_over_sequences(terms, lengths, method=f"kl-{estimator}+clt")

    log_weights = _as_float64(log_policy) - _as_float64(log_proposal)
    if log_weights.size != terms.size:
        raise InvalidInputError(
            f"got {log_weights.size} proposal log-probs for {terms.size} samples; give one per sample"
        )
    terms, log_weights = terms[keep], log_weights[keep]
    method = f"kl-{estimator}+self-normalized-importance-sampling"
    weights = self_normalized_weights(log_weights)
    if terms.size == 0 or not math.isfinite(weights.effective_sample_size) or weights.effective_sample_size == 0:
        return Estimate(math.nan, math.nan, math.nan, math.nan, int(terms.size), method)
    value = float((weights.normalized * terms).sum())
    # Delta method for a ratio estimator: se² = Σ w̄ᵢ²·(termᵢ − value)².
    standard_error = math.sqrt(float((weights.normalized**2 * (terms - value) ** 2).sum()))
    estimate = normal_estimate(
        value, standard_error, int(terms.size), method,
        effective_sample_size=weights.effective_sample_size, pareto_k=pareto_k(log_weights),
    )
    excluded = int((~keep).sum())
    if excluded:
        estimate = estimate.with_notes(f"{excluded} of {keep.size} sequences have no generated token and are excluded")
    return estimate

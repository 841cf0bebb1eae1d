"""Fitting the coefficients λ of a distributional target on base-model samples.

Natural logs. The target is p_c(x) ∝ π0(x|c)·w(x)·exp(λ·φ(x)) for each prompt
c (one prompt when generation is unconditional), where w = max(b, ε) is an
optional pointwise factor. λ minimizes the convex dual

    L(λ) = mean_c log Z_c(λ) − λ·μ̄,    Z_c(λ) = E_{π0(·|c)}[w·exp(λ·φ)],

whose gradient mean_c E_{p_c}[φ] − μ̄ vanishes exactly when the moments,
averaged over prompts, equal μ̄. Z_c is estimated by importance sampling from
base samples x_i ∼ π0(·|c) (or, for exact values, from the whole enumerated
space with log-weights log π0(x)). The minimization is Newton's method with a
backtracking line search, in log space and float64; the Hessian
mean_c Cov_{p_c}[φ] is positive definite whenever every feature varies.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from fdiv_eval.errors import EstimationError, InvalidInputError
from fdiv_eval.estimates import Estimate, effective_sample_size, normal_estimate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MomentFit:
    """The fitted λ and what it achieves on the fit sample."""

    coefficients: np.ndarray
    """λ, float64 [K]."""
    achieved: list[Estimate]
    """E_p[φ_k] under the fitted target, self-normalized over the fit sample, with delta-method CIs."""
    desired: np.ndarray
    effective_sample_size: float
    """Kish ESS of the weights w·exp(λ·φ), summed over prompts."""
    iterations: int
    gradient_norm: float
    """max_k |mean_c E_{p_c}[φ_k] − μ̄_k| at the solution."""

    def summary(self, names: list[str]) -> dict:
        """A JSON-ready description for reports and checkpoints."""
        return {
            "coefficients": {name: float(value) for name, value in zip(names, self.coefficients)},
            "achieved_moments": {name: estimate.to_dict() for name, estimate in zip(names, self.achieved)},
            "desired_moments": {name: float(value) for name, value in zip(names, self.desired)},
            "effective_sample_size": self.effective_sample_size,
            "samples": self.achieved[0].n if self.achieved else 0,
            "iterations": self.iterations,
            "gradient_norm": self.gradient_norm,
        }


def _log_sum_exp(values: np.ndarray) -> float:
    peak = values.max()
    return float(peak + math.log(np.exp(values - peak).sum()))


def _group_statistics(features: np.ndarray, log_weights: np.ndarray, coefficients: np.ndarray):
    """log Z up to a constant, the self-normalized mean [K] and covariance [K, K] of φ in one group."""
    log_tilted = log_weights + features @ coefficients
    log_normalizer = _log_sum_exp(log_tilted)
    weights = np.exp(log_tilted - log_normalizer)
    mean = weights @ features
    centered = features - mean
    covariance = (centered * weights[:, None]).T @ centered
    return log_normalizer, mean, covariance, weights


def _validate(features: np.ndarray, desired: np.ndarray, log_weights: np.ndarray, names: list[str]) -> None:
    if features.ndim != 2 or features.shape[1] != desired.size or features.shape[0] != log_weights.size:
        raise ValueError(f"shape mismatch: features {features.shape}, moments {desired.shape}, weights {log_weights.shape}")
    if not np.isfinite(features).all():
        raise InvalidInputError("feature values must be finite; a scorer returned NaN or ±∞")
    support = np.isfinite(log_weights)
    if not support.any():
        raise EstimationError(
            f"no fit sample satisfies the pointwise constraint, so λ cannot be fitted on {log_weights.size} "
            "base samples: raise target.fit_samples or loosen the constraint"
        )
    for k, name in enumerate(names):
        column = features[support, k]
        low, high = float(column.min()), float(column.max())
        if low == high == 0.0:
            raise EstimationError(
                f"feature {name!r} never fires: it is 0 on all {column.size} base samples, so no λ can reach "
                f"moment {desired[k]:g}; raise target.fit_samples or choose a feature the base model produces"
            )
        if low == high:
            raise EstimationError(
                f"feature {name!r} is constant ({low:g}) on all {column.size} base samples, so no λ can move "
                f"its moment to {desired[k]:g}; choose a feature that varies"
            )
        if not (low < desired[k] < high):
            raise EstimationError(
                f"moment {desired[k]:g} of feature {name!r} is outside the range the base samples can reach, "
                f"the open interval ({low:g}, {high:g}); choose a moment strictly inside it or raise target.fit_samples"
            )


def fit_coefficients(
    features,
    desired,
    log_weights=None,
    groups=None,
    names: list[str] | None = None,
    tolerance: float = 1e-10,
    max_iterations: int = 200,
) -> MomentFit:
    """Fit λ so that the importance-weighted moments of ``features`` equal ``desired``.

    ``features`` is [n, K]; ``log_weights`` [n] contains log w(x_i) − log q(x_i)
    + log π0(x_i) up to a constant per group (0 for plain base samples, −∞
    for samples that violate a hard constraint); ``groups`` [n] assigns each
    sample to its prompt. Raises EstimationError when a desired moment lies
    outside the open range of its feature on the samples (reaching the
    boundary would need λ = ±∞), when a feature never varies, or when the
    moments are jointly unreachable so that Newton's method does not converge.
    """
    features = np.asarray(features, dtype=np.float64)
    desired = np.asarray(desired, dtype=np.float64).reshape(-1)
    if features.ndim == 1:
        features = features[:, None]
    n, k = features.shape
    log_weights = np.zeros(n) if log_weights is None else np.asarray(log_weights, dtype=np.float64).reshape(-1)
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups).reshape(-1)
    names = names or [f"phi_{index}" for index in range(k)]
    _validate(features, desired, log_weights, names)

    members = []
    for group in np.unique(groups):
        rows = (groups == group) & np.isfinite(log_weights)
        if rows.any():
            members.append((features[rows], log_weights[rows]))
    if not members:
        raise EstimationError("no prompt has a fit sample inside the constraint; raise target.fit_samples")

    def evaluate(coefficients: np.ndarray):
        value, gradient, hessian = 0.0, np.zeros(k), np.zeros((k, k))
        for group_features, group_log_weights in members:
            log_normalizer, mean, covariance, _ = _group_statistics(group_features, group_log_weights, coefficients)
            value += log_normalizer
            gradient += mean
            hessian += covariance
        count = len(members)
        return value / count - coefficients @ desired, gradient / count - desired, hessian / count

    coefficients = np.zeros(k)
    value, gradient, hessian = evaluate(coefficients)
    iterations = 0
    while np.max(np.abs(gradient)) > tolerance and iterations < max_iterations:
        iterations += 1
        # A tiny ridge keeps the solve stable when the covariance is nearly singular.
        ridge = 1e-12 * max(float(np.trace(hessian)), 1e-300)
        step = -np.linalg.solve(hessian + ridge * np.eye(k), gradient)
        slope = float(gradient @ step)
        size = 1.0
        while True:
            candidate = coefficients + size * step
            candidate_value, candidate_gradient, candidate_hessian = evaluate(candidate)
            # Armijo condition; the dual is convex, so a descent step always exists.
            if candidate_value <= value + 1e-4 * size * slope or size < 1e-12:
                break
            size *= 0.5
        if size < 1e-12 and candidate_value > value:
            break
        coefficients, value, gradient, hessian = candidate, candidate_value, candidate_gradient, candidate_hessian
        logger.debug("moment fit iteration %d: max |gradient| %.3g", iterations, np.max(np.abs(gradient)))

    gradient_norm = float(np.max(np.abs(gradient)))
    if not np.isfinite(coefficients).all() or gradient_norm > 1e-6:
        raise EstimationError(
            f"the moments {desired.tolist()} of features {names} cannot be reached together on these base samples "
            f"(after {iterations} Newton steps the moment error is {gradient_norm:.3g}); "
            "choose moments closer to the base model's or raise target.fit_samples"
        )

    achieved, ess = _achieved_moments(members, coefficients, k)
    return MomentFit(coefficients, achieved, desired, ess, iterations, gradient_norm)


def _achieved_moments(members, coefficients: np.ndarray, k: int) -> tuple[list[Estimate], float]:
    """Self-normalized E_p[φ_k], averaged over prompts, with delta-method standard errors.

    For one group, se² of the ratio Σw̃φ/Σw̃ is Σ w̄_i²·(φ_i − m)² with the
    normalized weights w̄; groups are independent, so their variances add
    with factor 1/C².
    """
    count = len(members)
    means = np.zeros(k)
    variances = np.zeros(k)
    ess_total, n_total = 0.0, 0
    for group_features, group_log_weights in members:
        _, mean, _, weights = _group_statistics(group_features, group_log_weights, coefficients)
        means += mean / count
        variances += (weights[:, None] ** 2 * (group_features - mean) ** 2).sum(axis=0) / count**2
        ess_total += effective_sample_size(group_log_weights + group_features @ coefficients)
        n_total += group_features.shape[0]
    estimates = [
        normal_estimate(float(means[index]), math.sqrt(float(variances[index])), n_total,
                        "self-normalized-importance-sampling+delta", effective_sample_size=ess_total)
        for index in range(k)
    ]
    return estimates, ess_total


def fit_target(target, base, tokenizer, prompt_ids_list, samples: int, max_new_tokens: int, seed: int,
               batch_size: int = 256, progress=None, prompt_texts=None):
    """Fit λ of a distributional target on a fresh base-model sample; return the fitted target.

    ``prompt_ids_list`` contains one prompt (token ids [P]) per context; the
    ``samples`` base draws are split evenly across them. The same seed gives
    the same λ, so training and audit agree on the target.
    """
    from dataclasses import replace

    from fdiv_eval.sequences import sample

    count = len(prompt_ids_list)
    per_prompt = max(2, -(-samples // count))
    feature_blocks, log_weight_blocks, group_blocks = [], [], []
    advance = progress("sampling the base model to fit λ", per_prompt * count) if progress else None
    for index, prompt_ids in enumerate(prompt_ids_list):
        batch = sample(base, prompt_ids, per_prompt, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                       batch_size=batch_size, seed=seed + index, progress=advance)
        texts = tokenizer.batch_decode(batch.sequences.tolist(), skip_special_tokens=True)
        prompts = None if prompt_texts is None else [prompt_texts[index]] * len(texts)
        feature_blocks.append(target.feature_values(texts, prompts))
        log_weight_blocks.append(target.base_log_potential(texts, prompts))
        group_blocks.append(np.full(len(texts), index))
    fit = fit_coefficients(np.concatenate(feature_blocks), target.moments, np.concatenate(log_weight_blocks),
                           np.concatenate(group_blocks), target.names)
    logger.info("fitted λ = %s in %d Newton steps (ESS %.0f of %d)", fit.coefficients, fit.iterations,
                fit.effective_sample_size, per_prompt * count)
    return replace(target, coefficients=tuple(float(v) for v in fit.coefficients), fit=fit.summary(target.names))

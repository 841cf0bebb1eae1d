"""Audit metrics that depend on the kind of target: moments and rewards.

Natural logs, nats. Metric names:

- ``moment/<feature>``: E_π[φ_k] on the policy sample (mean, CLT interval);
- ``target_moment/<feature>``: E_p[φ_k] on the independent audit base sample,
  self-normalized, which checks the fitted λ on fresh data;
- ``reward``: E_π[r] on the policy sample;
- ``target_reward``: E_p[r], self-normalized from the base sample;
- ``rlhf_objective``: E_π[r] − β·KL(π‖π0), the KL-regularized RLHF objective,
  as the mean of r(x) − β·(log π(x) − log π0(x)) over x ∼ π.

A self-normalized estimate E_p[g] = Σ w_i g_i / Σ w_i with w = P/π0 on
x_i ∼ π0 is a ratio of two means; its standard error comes from the delta
method over both means.
"""

from __future__ import annotations

import numpy as np
import torch

from fdiv_eval.estimates import Estimate, effective_sample_size, mean_estimate, pareto_k
from fdiv_eval.estimators import delta_method

MOMENT_PREFIX = "moment/"
TARGET_MOMENT_PREFIX = "target_moment/"


def self_normalized_mean(values, log_weights) -> Estimate:
    """E_p[g] from samples of q with log-weights log(P/q), with a delta-method CI, ESS and Pareto k̂."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    log_weights = np.asarray(log_weights, dtype=np.float64).reshape(-1)
    inside = np.isfinite(log_weights)
    weights = np.zeros_like(log_weights)
    weights[inside] = np.exp(log_weights[inside] - log_weights[inside].max())
    columns = np.stack([weights * np.where(inside, values, 0.0), weights], axis=1)

    def ratio(means: torch.Tensor) -> torch.Tensor:
        return means[0] / means[1]

    estimate = delta_method(columns, ratio, "self-normalized-importance-sampling+delta")
    return Estimate(**{**estimate.__dict__, "effective_sample_size": effective_sample_size(log_weights),
                       "pareto_k": pareto_k(log_weights)})


def policy_target_metrics(target, texts, prompts, log_policy, log_base) -> dict[str, Estimate]:
    """Moments or rewards of the policy sample, by target kind; empty for pointwise targets."""
    kind = getattr(target, "kind", "pointwise")
    metrics: dict[str, Estimate] = {}
    if kind == "distributional":
        values = target.feature_values(texts, prompts)
        for index, name in enumerate(target.names):
            metrics[MOMENT_PREFIX + name] = mean_estimate(values[:, index])
    elif kind == "reward":
        rewards = target.rewards(texts, prompts)
        metrics["reward"] = mean_estimate(rewards)
        drift = np.asarray(log_policy, dtype=np.float64) - np.asarray(log_base, dtype=np.float64)
        metrics["rlhf_objective"] = mean_estimate(rewards - target.beta * drift)
    return metrics


def base_sample_target_metrics(target, texts, prompts, log_potential) -> dict[str, Estimate]:
    """E_p[φ_k] or E_p[r] from a base-model sample, self-normalized by P/π0."""
    kind = getattr(target, "kind", "pointwise")
    metrics: dict[str, Estimate] = {}
    if kind == "distributional":
        values = target.feature_values(texts, prompts)
        for index, name in enumerate(target.names):
            metrics[TARGET_MOMENT_PREFIX + name] = self_normalized_mean(values[:, index], log_potential)
    elif kind == "reward":
        metrics["target_reward"] = self_normalized_mean(target.rewards(texts, prompts), log_potential)
    return metrics

"""The ``Estimate`` result type and the statistics behind its intervals.

Every number the audit reports is an ``Estimate``: a value with its standard
error, a 95% confidence interval, the sample size n, the method that produced
it and, for importance-sampling estimates, the effective sample size and the
Pareto k̂ diagnostic. Reductions over samples run in float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

Z_95 = 1.959963984540054
"""Two-sided 95% quantile of the standard normal distribution."""

PARETO_K_THRESHOLD = 0.7
"""Above this k̂, importance-sampling estimates are unreliable (Vehtari et al., 2024, "Pareto smoothed importance sampling")."""

MIN_EFFECTIVE_SAMPLE_SIZE = 10.0
"""Below this ESS an importance-sampling estimate is flagged unreliable."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its uncertainty."""

    value: float
    standard_error: float
    ci_low: float
    ci_high: float
    n: int
    """Number of samples the estimate used (the policy sample for composites)."""
    method: str
    """Name of the estimator behind the value and interval, for example ``mean+clt`` or ``wilson``."""
    effective_sample_size: float | None = None
    """Kish ESS of the importance weights, for importance-sampling estimates."""
    pareto_k: float | None = None
    """Pareto k̂ of the importance weights' upper tail, for importance-sampling estimates."""
    exact: float | None = None
    """The exact value, where the sequence space was enumerated."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def reliable(self) -> bool:
        """False when k̂ > 0.7 or the ESS is below 10, or the value is NaN."""
        if math.isnan(self.value):
            return False
        if self.pareto_k is not None and self.pareto_k > PARETO_K_THRESHOLD:
            return False
        if self.effective_sample_size is not None and self.effective_sample_size < MIN_EFFECTIVE_SAMPLE_SIZE:
            return False
        return True

    def with_notes(self, *notes: str) -> "Estimate":
        return replace(self, notes=self.notes + tuple(notes))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        data["reliable"] = self.reliable
        return {key: encode_float(value) for key, value in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Estimate":
        fields = {key: decode_float(value) for key, value in data.items() if key != "reliable"}
        fields["notes"] = tuple(fields.get("notes", ()))
        fields["n"] = int(fields["n"])
        return cls(**fields)


def encode_float(value: Any) -> Any:
    """Encode non-finite floats as the strings ``"inf"``, ``"-inf"`` and ``"nan"`` for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            return "nan"
        return "inf" if value > 0 else "-inf"
    return value


def decode_float(value: Any) -> Any:
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    return value


def constant_estimate(value: float, n: int, method: str) -> Estimate:
    """Return an estimate with no sampling error (for example +∞ from a violated constraint)."""
    return Estimate(value, 0.0, value, value, n, method)


def mean_estimate(terms: np.ndarray, method: str = "mean+clt") -> Estimate:
    """Sample mean with a CLT standard error and normal 95% interval.

    se = sd(terms)/√n with the n − 1 denominator. An infinite term makes the
    value infinite with zero standard error.
    """
    terms = np.asarray(terms, dtype=np.float64)
    n = terms.size
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, math.nan, 0, method)
    value = float(terms.mean())
    if not math.isfinite(value):
        return constant_estimate(value, n, method)
    standard_error = float(terms.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return Estimate(value, standard_error, value - Z_95 * standard_error, value + Z_95 * standard_error, n, method)


def normal_estimate(value: float, standard_error: float, n: int, method: str, **extra: Any) -> Estimate:
    """Wrap a value and a standard error into an estimate with a normal 95% interval."""
    if not math.isfinite(value):
        return Estimate(value, 0.0, value, value, n, method, **extra)
    return Estimate(
        value, standard_error, value - Z_95 * standard_error, value + Z_95 * standard_error, n, method, **extra
    )


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """Return the Wilson score 95% interval for a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1.0 + Z_95**2 / n
    center = (p + Z_95**2 / (2 * n)) / denominator
    half_width = Z_95 * math.sqrt(p * (1 - p) / n + Z_95**2 / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, center - half_width)
    high = 1.0 if successes == n else min(1.0, center + half_width)
    return (low, high)


def rate_estimate(indicators: np.ndarray) -> Estimate:
    """Proportion of true indicators, with a Wilson interval and the binomial standard error."""
    indicators = np.asarray(indicators, dtype=bool)
    n = indicators.size
    successes = int(indicators.sum())
    value = successes / n if n else math.nan
    low, high = wilson_interval(successes, n)
    standard_error = math.sqrt(value * (1 - value) / n) if n else math.nan
    return Estimate(value, standard_error, low, high, n, "wilson")


def log_sum_exp(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return -math.inf
    peak = values.max()
    if not math.isfinite(peak):
        return float(peak)
    return float(peak + math.log(np.exp(values - peak).sum()))


def effective_sample_size(log_weights: np.ndarray) -> float:
    """Kish effective sample size (Σw)²/Σw², from log-weights.

    Lies in [1, n] when any weight is positive and does not change when every
    weight is multiplied by the same constant. Returns 0 when all weights are 0.
    """
    log_weights = np.asarray(log_weights, dtype=np.float64)
    first = log_sum_exp(log_weights)
    if first == -math.inf:
        return 0.0
    return float(math.exp(2.0 * first - log_sum_exp(2.0 * log_weights)))


def _log_sum_exp_array(values: np.ndarray) -> float:
    peak = values.max()
    return float(peak + np.log(np.exp(values - peak).sum()))


def _generalized_pareto_fit(exceedances: np.ndarray) -> float:
    """Return the shape k of a generalized Pareto fit to positive exceedances.

    Uses the empirical Bayes estimate of Zhang and Stephens (2009,
    Technometrics 51(3)), with the weakly informative prior on k of Vehtari et
    al. (2024) that pulls k̂ toward 0.5 for small tails.
    """
    x = np.sort(exceedances)
    n = x.size
    prior = 3.0
    m = 30 + int(math.sqrt(n))
    quartile = x[int(n / 4 + 0.5) - 1]
    grid = 1.0 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))
    theta = 1.0 / x[-1] + grid / (prior * quartile)
    k = np.log1p(-theta[:, None] * x[None, :]).mean(axis=1)
    log_likelihood = n * (np.log(-theta / k) - k - 1.0)
    # Posterior weights exp(ℓ_i)/Σ_j exp(ℓ_j), computed in log space.
    weights = np.exp(log_likelihood - _log_sum_exp_array(log_likelihood))
    theta_hat = float((theta * weights).sum())
    k_hat = float(np.log1p(-theta_hat * x).mean())
    # Weakly informative prior: shrink toward 0.5 with weight 10 pseudo-samples.
    return (n * k_hat + 10 * 0.5) / (n + 10)


def pareto_k(log_weights: np.ndarray) -> float:
    """Pareto k̂ of the upper tail of importance weights (NaN when too few samples).

    Fits a generalized Pareto distribution to the largest M = min(n/5, 3√n)
    weights above the (M+1)-th largest. k̂ > 0.7 means the weights' variance
    is effectively infinite and IS estimates are unreliable.
    """
    log_weights = np.asarray(log_weights, dtype=np.float64)
    finite = log_weights[np.isfinite(log_weights)]
    n = finite.size
    tail_size = int(min(n / 5.0, 3.0 * math.sqrt(n)))
    if tail_size < 5:
        return math.nan
    ordered = np.sort(finite - finite.max())
    threshold = ordered[-tail_size - 1]
    tail = np.exp(ordered[-tail_size:]) - math.exp(threshold)
    if np.count_nonzero(tail > 0) < 5:
        # NOTE: a flat upper tail (many equal largest weights) has no Pareto fit;
        # such weights are bounded, so NaN here does not flag the estimate.
        return math.nan
    return _generalized_pareto_fit(tail[tail > 0])


@dataclass(frozen=True)
class ImportanceWeights:
    """Self-normalized importance weights w_i/Σw with their Kish effective sample size."""

    normalized: np.ndarray
    """float64 weights that sum to 1; all NaN when every weight is 0."""
    effective_sample_size: float


def self_normalized_weights(log_weights) -> ImportanceWeights:
    """Normalize importance weights given as log-weights, in float64 whatever the input dtype.

    The log-weights are cast to float64 and shifted by their maximum before
    exponentiating: exp(−107) underflows to 0 in float32, so exponentiating
    the raw values would give 0/0. Accepts NumPy arrays, lists and torch
    tensors of any float dtype; −inf is a zero weight.
    """
    log_weights = _log_weights_as_float64(log_weights)
    peak = log_weights.max() if log_weights.size else -math.inf
    if peak == -math.inf:
        return ImportanceWeights(np.full(log_weights.shape, math.nan), 0.0)
    if math.isnan(peak) or peak == math.inf:
        raise ValueError(f"log-weights must be finite or −inf, got maximum {peak}")
    scaled = np.exp(log_weights - peak)
    normalized = scaled / scaled.sum()
    return ImportanceWeights(normalized, float(1.0 / np.square(normalized).sum()))


@dataclass(frozen=True)
class ClippedWeights:
    """Importance weights clipped at a maximum, reported beside the raw weights."""

    raw: np.ndarray
    """The weights before clipping (float64, not normalized)."""
    clipped: np.ndarray
    """min(raw, max_weight)."""
    max_weight: float
    clipped_fraction: float
    """Fraction of weights that the clip changed; an estimate from clipped weights is biased by that share."""


def clip_importance_weights(log_weights, max_weight: float) -> ClippedWeights:
    """Clip importance weights exp(log_weights) at ``max_weight`` and count how many were clipped.

    Clipping bounds the variance of an importance-sampling estimate at the
    cost of a bias, so every clipped estimate must be reported with its
    clipped fraction and next to the value from the raw weights.
    """
    if not max_weight > 0:
        raise ValueError(f"max_weight must be positive, got {max_weight}; choose a clip level above 0")
    raw = np.exp(_log_weights_as_float64(log_weights))
    clipped = np.minimum(raw, max_weight)
    fraction = float(np.count_nonzero(raw > max_weight) / raw.size) if raw.size else 0.0
    return ClippedWeights(raw, clipped, float(max_weight), fraction)


def _log_weights_as_float64(log_weights) -> np.ndarray:
    if hasattr(log_weights, "detach"):
        log_weights = log_weights.detach().cpu().double().numpy()
    return np.asarray(log_weights, dtype=np.float64).reshape(-1)

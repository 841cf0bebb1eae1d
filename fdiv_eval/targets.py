"""Targets: unnormalized distributions P(x) = π0(x)·Φ(x) over generated text.

A target supplies the log-potential log Φ(x) = log P(x) − log π0(x) of each
sample; the partition function Z = Σ_x P(x) = E_π0[Φ] is estimated elsewhere.
With prompts, each prompt c has its own target P_c(x) = π0(x|c)·Φ(x, c) and
its own Z_c; the potential is the same function of (continuation, prompt).

Kinds, all with the interface ``log_potential(texts, prompts)``,
``constraint(texts, prompts)`` and ``describe()``:

- pointwise constraint: Φ(x) = max(b(x), ε) with a boolean feature b. With
  ε = 0 the target p(x) = π0(x)·b(x)/Z gives zero mass to every x with
  b(x) = 0, so any policy that can produce such an x is at infinite reverse
  KL from p;
- distributional constraints: Φ(x) = exp(λ·φ(x)) for features φ_k and
  coefficients λ fitted (``fdiv_eval.moments``) so that E_p[φ_k] = μ̄_k,
  optionally times a pointwise constraint;
- reward: Φ(x) = exp(r(x)/β) with β > 0, optionally times a pointwise
  constraint. Reverse-KL minimization toward this p is KL-regularized RLHF.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from fdiv_eval.errors import InvalidInputError


def _validate_words(words) -> tuple[str, ...]:
    if isinstance(words, str) or not words:
        raise InvalidInputError(f"target.words must be a non-empty list of words, got {words!r}")
    cleaned = []
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise InvalidInputError(f"target.words must contain non-empty strings, got {word!r}")
        cleaned.append(word.strip())
    return tuple(cleaned)


@dataclass(frozen=True)
class WordListFeature:
    """b(x) = 1 when the text contains any of the words (whole word, case-insensitive)."""

    words: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", _validate_words(self.words))

    @property
    def pattern(self) -> re.Pattern:
        alternatives = "|".join(re.escape(word) for word in sorted(self.words, key=len, reverse=True))
        return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def __call__(self, texts: list[str], prompts=None) -> np.ndarray:
        pattern = self.pattern
        return np.fromiter((pattern.search(text) is not None for text in texts), dtype=bool, count=len(texts))


@dataclass(frozen=True)
class PointwiseTarget:
    """P(x) = π0(x)·max(b(x), ε) for a boolean feature b and a floor ε ∈ [0, 1)."""

    feature: WordListFeature
    """b: a callable from (texts, prompts) to booleans, or to scores where b = score ≥ 0.5."""
    epsilon: float = 0.0
    kind = "pointwise"
    has_constraint = True

    def __post_init__(self) -> None:
        if not (0.0 <= self.epsilon < 1.0) or math.isnan(self.epsilon):
            raise InvalidInputError(
                f"target.epsilon must lie in [0, 1), got {self.epsilon!r}; use 0 for a hard constraint"
            )

    @property
    def is_hard(self) -> bool:
        return self.epsilon == 0.0

    def constraint(self, texts: list[str], prompts=None) -> np.ndarray:
        """b(x) per text, as booleans."""
        values = np.asarray(self.feature(texts, prompts))
        return values if values.dtype == bool else values >= 0.5

    def log_potential(self, texts: list[str], prompts=None) -> np.ndarray:
        """log max(b(x), ε) per text, float64 (−∞ where b = 0 and ε = 0)."""
        satisfied = self.constraint(texts, prompts)
        floor = math.log(self.epsilon) if self.epsilon > 0 else -math.inf
        return np.where(satisfied, 0.0, floor).astype(np.float64)

    @property
    def constraint_description(self):
        """The target words, or the scorer that defines b."""
        if isinstance(self.feature, WordListFeature):
            return self.feature.words
        return self.feature.describe()

    def describe(self) -> dict:
        if not isinstance(self.feature, WordListFeature):
            return {
                "type": "pointwise",
                "constraint": self.feature.describe(),
                "epsilon": self.epsilon,
                "formula": "P(x) = pi0(x) * max(b(x), epsilon), b(x) = 1 when the constraint score is at least 0.5",
            }
        return {
            "type": "word_list",
            "words": list(self.feature.words),
            "epsilon": self.epsilon,
            "formula": "P(x) = pi0(x) * max(b(x), epsilon), b(x) = 1 when x contains any listed word",
        }


def _constraint_part(constraint: PointwiseTarget | None, texts, prompts) -> np.ndarray:
    if constraint is None:
        return np.zeros(len(texts), dtype=np.float64)
    return constraint.log_potential(texts, prompts)


@dataclass(frozen=True)
class Feature:
    """One feature φ_k of a distributional target and its desired moment μ̄_k = E_p[φ_k]."""

    name: str
    scorer: object
    """A scorer: texts and prompts in, float64 [B] out (see ``fdiv_eval.scorers``)."""
    moment: float


class _OptionalConstraint:
    """Constraint properties of a target whose ``constraint_target`` may be None."""

    @property
    def has_constraint(self) -> bool:
        return self.constraint_target is not None

    @property
    def is_hard(self) -> bool:
        return self.constraint_target is not None and self.constraint_target.is_hard

    @property
    def constraint_description(self):
        return self.constraint_target.constraint_description if self.constraint_target else None


@dataclass(frozen=True)
class DistributionalTarget(_OptionalConstraint):
    """P(x) = π0(x)·exp(λ·φ(x)), optionally times max(b(x), ε).

    ``coefficients`` holds λ once fitted; ``fit`` holds the summary of the
    fit (achieved moments, ESS, iterations) for reports.
    """

    features: tuple[Feature, ...]
    constraint_target: PointwiseTarget | None = None
    coefficients: tuple[float, ...] | None = None
    fit: dict | None = None
    kind = "distributional"

    def __post_init__(self) -> None:
        if not self.features:
            raise InvalidInputError("a distributional target needs at least one feature in target.features")
        names = [feature.name for feature in self.features]
        if len(set(names)) != len(names):
            raise InvalidInputError(f"feature names must be unique, got {names}")
        for feature in self.features:
            if not math.isfinite(feature.moment):
                raise InvalidInputError(f"feature {feature.name!r} needs a finite moment, got {feature.moment!r}")

    @property
    def moments(self) -> np.ndarray:
        return np.array([feature.moment for feature in self.features], dtype=np.float64)

    @property
    def names(self) -> list[str]:
        return [feature.name for feature in self.features]

    def feature_values(self, texts: list[str], prompts=None) -> np.ndarray:
        """φ(x) for every text, float64 [B, K]."""
        from fdiv_eval.scorers import check_finite

        columns = [
            check_finite(np.asarray(f.scorer(texts, prompts), dtype=np.float64).reshape(-1), f"feature {f.name!r}")
            for f in self.features
        ]
        return np.stack(columns, axis=1) if columns else np.zeros((len(texts), 0))

    def constraint(self, texts: list[str], prompts=None) -> np.ndarray:
        if self.constraint_target is None:
            return np.ones(len(texts), dtype=bool)
        return self.constraint_target.constraint(texts, prompts)

    def base_log_potential(self, texts: list[str], prompts=None) -> np.ndarray:
        """log max(b, ε) alone: the potential at λ = 0."""
        return _constraint_part(self.constraint_target, texts, prompts)

    def log_potential(self, texts: list[str], prompts=None) -> np.ndarray:
        """λ·φ(x) + log max(b(x), ε) per text, float64."""
        if self.coefficients is None:
            raise InvalidInputError("the distributional target has no fitted coefficients; fit λ on base samples first")
        return self.base_log_potential(texts, prompts) + self.feature_values(texts, prompts) @ np.asarray(
            self.coefficients, dtype=np.float64
        )

    def describe(self) -> dict:
        description = {
            "type": "distributional",
            "features": [
                {"name": f.name, "moment": f.moment, "scorer": f.scorer.describe()} for f in self.features
            ],
            "coefficients": list(self.coefficients) if self.coefficients is not None else None,
            "formula": "P(x) = pi0(x) * exp(lambda . phi(x))" + (" * max(b(x), epsilon)" if self.has_constraint else ""),
        }
        if self.constraint_target is not None:
            description["constraint"] = self.constraint_target.describe()
        if self.fit is not None:
            description["fit"] = self.fit
        return description


@dataclass(frozen=True)
class RewardTarget(_OptionalConstraint):
    """P(x) = π0(x)·exp(r(x)/β) with β > 0, optionally times max(b(x), ε)."""

    reward: object
    """A scorer that returns r(x) (see ``fdiv_eval.scorers``)."""
    beta: float
    constraint_target: PointwiseTarget | None = None
    kind = "reward"

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise InvalidInputError(
                f"target.beta must be a positive number, got {self.beta!r}; β scales the reward as exp(r/β), "
                "so smaller β pulls harder toward high reward"
            )

    def rewards(self, texts: list[str], prompts=None) -> np.ndarray:
        """r(x) per text, float64."""
        from fdiv_eval.scorers import check_finite

        return check_finite(np.asarray(self.reward(texts, prompts), dtype=np.float64).reshape(-1), "the reward")

    def constraint(self, texts: list[str], prompts=None) -> np.ndarray:
        if self.constraint_target is None:
            return np.ones(len(texts), dtype=bool)
        return self.constraint_target.constraint(texts, prompts)

    def log_potential(self, texts: list[str], prompts=None) -> np.ndarray:
        """r(x)/β + log max(b(x), ε) per text, float64."""
        return self.rewards(texts, prompts) / self.beta + _constraint_part(self.constraint_target, texts, prompts)

    def describe(self) -> dict:
        description = {
            "type": "reward",
            "reward": self.reward.describe(),
            "beta": self.beta,
            "formula": "P(x) = pi0(x) * exp(r(x) / beta)" + (" * max(b(x), epsilon)" if self.has_constraint else ""),
        }
        if self.constraint_target is not None:
            description["constraint"] = self.constraint_target.describe()
        return description


def target_from_config(config, base_dir=None):
    """Build the target that a suite's ``target`` section describes (λ still unfitted).

    Relative scorer paths are looked up in ``base_dir`` (the suite file's
    folder) first, then in the working directory.
    """
    from fdiv_eval.scorers import build_scorer

    constraint = None
    if config.words:
        constraint = PointwiseTarget(WordListFeature(tuple(config.words)), config.epsilon)
    elif config.constraint is not None:
        scorer = build_scorer(config.constraint, base_dir, "target.constraint")
        constraint = PointwiseTarget(scorer, config.epsilon)

    if config.type in ("word_list", "pointwise"):
        if constraint is None:
            raise InvalidInputError(f"target type {config.type!r} needs target.words or target.constraint")
        return constraint
    if config.type == "distributional":
        features = tuple(
            Feature(f.name, build_scorer(f.scorer, base_dir, f"target.features[{i}].scorer"), float(f.moment))
            for i, f in enumerate(config.features)
        )
        return DistributionalTarget(features, constraint)
    if config.type == "reward":
        if config.reward is None:
            raise InvalidInputError("target type 'reward' needs target.reward (a scorer)")
        beta = config.beta if config.beta is not None else math.nan
        return RewardTarget(build_scorer(config.reward, base_dir, "target.reward"), beta, constraint)
    raise InvalidInputError(f"unknown target type {config.type!r}; choose word_list, pointwise, distributional or reward")

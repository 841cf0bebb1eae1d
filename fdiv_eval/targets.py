"""Targets: unnormalized distributions P(x) = π0(x)·φ(x) over generated text.

A target supplies the log-potential log φ(x) = log P(x) − log π0(x) of each
sample; the partition function Z = Σ_x P(x) = E_π0[φ] is estimated elsewhere.

Pointwise constraint: φ(x) = max(b(x), ε) with a boolean feature b. With ε = 0
the target p(x) = π0(x)·b(x)/Z gives zero mass to every x with b(x) = 0, so
any policy that can produce such an x is at infinite reverse KL from p.
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

    def __call__(self, texts: list[str]) -> np.ndarray:
        pattern = self.pattern
        return np.fromiter((pattern.search(text) is not None for text in texts), dtype=bool, count=len(texts))


@dataclass(frozen=True)
class PointwiseTarget:
    """P(x) = π0(x)·max(b(x), ε) for a boolean feature b and a floor ε ∈ [0, 1)."""

    feature: WordListFeature
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.epsilon < 1.0) or math.isnan(self.epsilon):
            raise InvalidInputError(
                f"target.epsilon must lie in [0, 1), got {self.epsilon!r}; use 0 for a hard constraint"
            )

    @property
    def is_hard(self) -> bool:
        return self.epsilon == 0.0

    def constraint(self, texts: list[str]) -> np.ndarray:
        """b(x) per text, as booleans."""
        return self.feature(texts)

    def log_potential(self, texts: list[str]) -> np.ndarray:
        """log max(b(x), ε) per text, float64 (−∞ where b = 0 and ε = 0)."""
        satisfied = self.constraint(texts)
        floor = math.log(self.epsilon) if self.epsilon > 0 else -math.inf
        return np.where(satisfied, 0.0, floor).astype(np.float64)

    def describe(self) -> dict:
        return {
            "type": "word_list",
            "words": list(self.feature.words),
            "epsilon": self.epsilon,
            "formula": "P(x) = pi0(x) * max(b(x), epsilon), b(x) = 1 when x contains any listed word",
        }

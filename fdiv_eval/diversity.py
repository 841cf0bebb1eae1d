"""Diversity of a set of generated texts: distinct-n and Self-BLEU.

Both work on words: lower-cased runs of letters, digits and underscores, and
single punctuation marks.
"""

from __future__ import annotations

import math
import re

import numpy as np

from fdiv_eval.estimates import Estimate, mean_estimate, normal_estimate

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _distinct_ratio(ngram_lists: list[list[tuple[str, ...]]]) -> float:
    total = sum(len(grams) for grams in ngram_lists)
    if total == 0:
        return math.nan
    unique = set()
    for grams in ngram_lists:
        unique.update(grams)
    return len(unique) / total


def distinct_n(texts: list[str], n: int, bootstrap_resamples: int = 200, seed: int = 0) -> Estimate:
    """Corpus-level distinct-n: unique n-grams over all n-grams, pooled across texts.

    It is a ratio over the whole corpus, not a mean of i.i.d. terms, so the
    standard error comes from a seeded bootstrap over texts. Resampling with
    replacement duplicates texts, which lowers the ratio, so the bootstrap
    spread is used around the full-sample value, not the bootstrap mean.
    """
    ngram_lists = [_ngrams(words(text), n) for text in texts]
    value = _distinct_ratio(ngram_lists)
    rng = np.random.default_rng(seed)
    replicates = []
    for _ in range(bootstrap_resamples):
        indices = rng.integers(0, len(texts), size=len(texts))
        replicates.append(_distinct_ratio([ngram_lists[i] for i in indices]))
    replicates = np.asarray(replicates, dtype=np.float64)
    replicates = replicates[np.isfinite(replicates)]
    standard_error = float(replicates.std(ddof=1)) if replicates.size > 1 else math.nan
    estimate = normal_estimate(value, standard_error, len(texts), "corpus-ratio+bootstrap-se")
    return Estimate(**{**estimate.__dict__, "ci_low": max(estimate.ci_low, 0.0), "ci_high": min(estimate.ci_high, 1.0)})


def self_bleu(texts: list[str], max_samples: int = 200) -> Estimate:
    """Self-BLEU (0–100, sacrebleu): each of the first ``max_samples`` texts against all the others.

    Samples are i.i.d., so the first ones are a random subset. Higher means
    less diverse. The standard error treats the per-text scores as
    independent, which they are not quite (they share references).
    """
    import sacrebleu

    subset = texts[:max_samples]
    if len(subset) < 2:
        return Estimate(math.nan, math.nan, math.nan, math.nan, len(subset), "self-bleu")
    scores = []
    for index, hypothesis in enumerate(subset):
        references = subset[:index] + subset[index + 1 :]
        scores.append(sacrebleu.sentence_bleu(hypothesis, references).score)
    estimate = mean_estimate(np.asarray(scores), method="self-bleu+clt")
    return estimate.with_notes(f"computed on {len(subset)} of {len(texts)} samples")

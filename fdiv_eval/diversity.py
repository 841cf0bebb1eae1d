"""Diversity of a set of generated texts: distinct-n and Self-BLEU.

Both split texts into tokens with a named tokenizer, recorded in each
estimate's ``method`` because the values depend on it:

- ``words`` (the default): lower-cased runs of letters, digits and
  underscores, and single punctuation marks;
- ``whitespace``: the text split on whitespace, unchanged.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import numpy as np

from fdiv_eval.errors import InvalidInputError
from fdiv_eval.estimates import Estimate, mean_estimate, normal_estimate

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


TOKENIZERS: dict[str, Callable[[str], list[str]]] = {"words": words, "whitespace": str.split}
"""Tokenizers that diversity metrics accept, by the name recorded with each estimate."""


def _tokenizer(name: str) -> Callable[[str], list[str]]:
    if name not in TOKENIZERS:
        raise InvalidInputError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]


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


def _bootstrap_distinct_ratios(ngram_lists: list[list[tuple[str, ...]]], resamples: int, seed: int) -> np.ndarray:
    """Distinct-n ratios of ``resamples`` bootstrap resamples of the texts, all at once.

    A sparse text × n-gram incidence matrix turns each resample into
    multiplicities w over texts: the resample's distinct n-grams are those
    with (incidenceᵀ·w) > 0, and its n-gram total is w·counts.
    """
    from scipy.sparse import csr_matrix

    count = len(ngram_lists)
    rng = np.random.default_rng(seed)
    multiplicities = np.stack([np.bincount(rng.integers(0, count, size=count), minlength=count)
                               for _ in range(resamples)]).astype(np.float64)  # [R, texts]
    index: dict[tuple[str, ...], int] = {}
    rows, columns = [], []
    for row, grams in enumerate(ngram_lists):
        for gram in set(grams):
            rows.append(row)
            columns.append(index.setdefault(gram, len(index)))
    totals = multiplicities @ np.array([len(grams) for grams in ngram_lists], dtype=np.float64)
    if not index:
        return np.full(resamples, np.nan)
    incidence = csr_matrix((np.ones(len(rows)), (rows, columns)), shape=(count, len(index)))
    distinct = np.asarray((incidence.T @ multiplicities.T) > 0).sum(axis=0)  # [R]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, distinct / totals, np.nan)


def distinct_n(
    texts: list[str], n: int, bootstrap_resamples: int = 200, seed: int = 0, tokenizer: str = "words"
) -> Estimate:
    """Corpus-level distinct-n: unique n-grams over all n-grams, pooled across texts.

    It is a ratio over the whole corpus, not a mean of i.i.d. terms, so the
    standard error comes from a seeded bootstrap over texts. Resampling with
    replacement duplicates texts, which lowers the ratio, so the bootstrap
    spread is used around the full-sample value, not the bootstrap mean.
    See ``distinct_n_per_sample`` for the mean of per-text ratios.
    """
    split = _tokenizer(tokenizer)
    ngram_lists = [_ngrams(split(text), n) for text in texts]
    value = _distinct_ratio(ngram_lists)
    replicates = _bootstrap_distinct_ratios(ngram_lists, bootstrap_resamples, seed)
    replicates = replicates[np.isfinite(replicates)]
    standard_error = float(replicates.std(ddof=1)) if replicates.size > 1 else math.nan
    method = f"corpus-ratio+bootstrap-se,tokenizer={tokenizer}"
    estimate = normal_estimate(value, standard_error, len(texts), method)
    return Estimate(**{**estimate.__dict__, "ci_low": max(estimate.ci_low, 0.0), "ci_high": min(estimate.ci_high, 1.0)})


def distinct_n_per_sample(texts: list[str], n: int, tokenizer: str = "words") -> Estimate:
    """Per-sample distinct-n: the mean over texts of each text's unique n-grams over its n-grams.

    Texts shorter than n tokens have no n-gram, so they are left out of the
    mean and counted in a note. Always at least the corpus-level value, because
    n-grams repeated across texts count as repeats only there.
    """
    split = _tokenizer(tokenizer)
    ratios = np.asarray([_distinct_ratio([_ngrams(split(text), n)]) for text in texts], dtype=np.float64)
    kept = ratios[np.isfinite(ratios)]
    estimate = mean_estimate(kept, method=f"per-sample-mean+clt,tokenizer={tokenizer}")
    estimate = Estimate(**{**estimate.__dict__, "ci_low": max(estimate.ci_low, 0.0), "ci_high": min(estimate.ci_high, 1.0)})
    if kept.size < ratios.size:
        excluded = ratios.size - kept.size
        estimate = estimate.with_notes(f"{excluded} of {ratios.size} texts have no {n}-gram and are excluded")
    return estimate


def sentence_bleu(hypothesis: list[str], references: list[list[str]], max_order: int = 4) -> float:
    """BLEU of one tokenized hypothesis against tokenized references, in [0, 1], by sacrebleu.

    Modified n-gram precisions clip each n-gram's count at its largest count
    in any one reference. The brevity penalty exp(1 − r/c) applies when the
    hypothesis length c is below r, the reference length closest to c. The
    score is the brevity penalty times the geometric mean of the precisions
    of orders 1..max_order, leaving out orders longer than the hypothesis
    (``effective_order``). No unigram match gives 0, and a higher order with
    no match gets the exponential smoothing of Chen and Cherry (2014),
    sacrebleu's default for sentence BLEU. The tokens are joined with spaces
    and not tokenized again (``tokenize="none"``).
    """
    from sacrebleu.metrics import BLEU

    scorer = BLEU(max_ngram_order=max_order, tokenize="none", effective_order=True)
    score = scorer.sentence_score(" ".join(hypothesis), [" ".join(reference) for reference in references]).score
    # sacrebleu works on a 0-100 scale in log space, so an exact match can come out as 100.00000000000004.
    return min(score / 100.0, 1.0)


def self_bleu(
    texts: list[str], max_samples: int = 200, max_order: int = 4, seed: int = 0, tokenizer: str = "words"
) -> Estimate:
    """Self-BLEU in [0, 1]: the mean BLEU of each sample against all the other samples.

    Each sample is the hypothesis once, with every other sample as a
    reference (leave-one-out); higher means less diverse. It is 1 when all
    samples are identical, and the value does not depend on their order.
    NOTE: it is also 1 when every sample has an exact duplicate among the
    others, because multi-reference BLEU scores each sample against its
    best-matching reference; for max_order = 1 a reordering of the same
    words also matches exactly.

    The cost is quadratic, so above ``max_samples`` texts a random subset of
    that size is drawn with ``seed``. It is drawn from the texts in sorted
    order, so it does not depend on their order, and the note records both. The
    standard error treats the per-sample scores as independent, which they
    are not quite (they share references).
    """
    if max_order < 1:
        raise InvalidInputError(f"max_order must be at least 1, got {max_order}")
    if max_samples < 2:
        raise InvalidInputError(f"max_samples must be at least 2, got {max_samples}")
    split = _tokenizer(tokenizer)
    method = f"self-bleu-{max_order}+clt,tokenizer={tokenizer}"
    subset = sorted(texts)
    note = f"computed on all {len(texts)} samples"
    if len(subset) > max_samples:
        chosen = np.random.default_rng(seed).choice(len(subset), size=max_samples, replace=False)
        subset = [subset[index] for index in np.sort(chosen)]
        note = f"computed on a random subset of {max_samples} of {len(texts)} samples, seed {seed}"
    if len(subset) < 2:
        return Estimate(math.nan, math.nan, math.nan, math.nan, len(subset), method).with_notes(
            "Self-BLEU needs at least 2 samples"
        )
    tokens = [split(text) for text in subset]
    scores = []
    for index, hypothesis in enumerate(tokens):
        references = tokens[:index] + tokens[index + 1 :]
        scores.append(sentence_bleu(hypothesis, references, max_order))
    estimate = mean_estimate(np.asarray(scores), method=method)
    estimate = Estimate(**{**estimate.__dict__, "ci_low": max(estimate.ci_low, 0.0), "ci_high": min(estimate.ci_high, 1.0)})
    return estimate.with_notes(note)

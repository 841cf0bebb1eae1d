"""Diversity of generated texts, as an `evaluate` module: corpus-level distinct-n and Self-BLEU.

Words are lower-cased runs of letters, digits and underscores, and single
punctuation marks. ``distinct_N_corpus`` is unique N-grams over all N-grams
pooled across the texts, with a seeded bootstrap standard error over texts.
``self_bleu`` (a fraction in [0, 1], by sacrebleu) scores each of
``self_bleu_samples`` texts, a seeded random subset when there are more,
against all the others; higher means less diverse. Both are the estimators of the fdiv-eval audit.
"""

import datasets
import evaluate

from fdiv_eval.diversity import distinct_n, self_bleu

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated texts.
    orders: n-gram orders of distinct-n (default [1, 2, 3]).
    self_bleu_samples: texts scored by Self-BLEU (default 200).
    bootstrap_resamples: resamples for the distinct-n standard errors (default 200).
    seed: seed of the bootstrap (default 0).
Returns:
    distinct_N_corpus and distinct_N_corpus_standard_error per order, self_bleu and
    self_bleu_standard_error, and n.
Example:
    >>> metric = evaluate.load("fdiv_eval/evaluate_modules/diversity")
    >>> metric.compute(predictions=["the cat sat", "the dog sat"], orders=[1])["distinct_1_corpus"]
    0.6666666666666666
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Diversity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, orders=(1, 2, 3), self_bleu_samples=200, bootstrap_resamples=200, seed=0):
        texts = list(predictions)
        results = {"n": len(texts)}
        for order in orders:
            estimate = distinct_n(texts, int(order), bootstrap_resamples, seed=seed)
            results[f"distinct_{order}_corpus"] = estimate.value
            results[f"distinct_{order}_corpus_standard_error"] = estimate.standard_error
        estimate = self_bleu(texts, self_bleu_samples)
        results["self_bleu"] = estimate.value
        results["self_bleu_standard_error"] = estimate.standard_error
        return results

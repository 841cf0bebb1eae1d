"""f-divergences D_f(π‖p) between a model π and a normalized target p, as an `evaluate` module.

Inputs are per-sample log-probabilities, in nats, of sequences drawn from the
model π: ``log_probs`` = log π(x_i) and ``target_log_probs`` = log p(x_i).
An unnormalized target log P(x_i) works too when ``target_log_partition``
(log Z) is given. Each divergence is the sample mean of the policy term
E_π[f(π/p)·p/π] of the fdiv-eval audit, with a CLT standard error and a 95%
confidence interval clipped to the divergence's range. Natural logs: KL and
JS are in nats, JS is the divergence (no square root), TV = ½·Σ|π − p| and
Hellinger is squared.
"""

import datasets
import evaluate
import numpy as np

from fdiv_eval.divergences import DIVERGENCES, get_divergence
from fdiv_eval.estimators import model_divergence

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    log_probs: log π(x_i) of each sample x_i drawn from the model, in nats.
    target_log_probs: log p(x_i) of the same samples under the target (or log P(x_i) with target_log_partition).
    divergences: names to compute, default all of forward_kl, reverse_kl, js, tv, hellinger, chi2_pearson,
        chi2_neyman.
    target_log_partition: log Z subtracted from target_log_probs when they are unnormalized (default 0).
Returns:
    For each divergence NAME: NAME, NAME_standard_error, NAME_ci_low, NAME_ci_high; and n.
Example:
    >>> metric = evaluate.load("fdiv_eval/evaluate_modules/f_divergence")
    >>> metric.compute(log_probs=[-1.2, -0.7], target_log_probs=[-1.0, -0.9], divergences=["js"])["js"]
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FDivergence(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "log_probs": datasets.Value("float64"),
                "target_log_probs": datasets.Value("float64"),
            }),
        )

    def _compute(self, log_probs, target_log_probs, divergences=None, target_log_partition=0.0):
        names = list(divergences) if divergences is not None else list(DIVERGENCES)
        log_ratios = np.asarray(log_probs, dtype=np.float64) - (
            np.asarray(target_log_probs, dtype=np.float64) - float(target_log_partition)
        )
        results = {"n": int(log_ratios.size)}
        for name in names:
            estimate = model_divergence(get_divergence(name), log_ratios, sampled_from="a")
            results[name] = estimate.value
            results[f"{name}_standard_error"] = estimate.standard_error
            results[f"{name}_ci_low"] = estimate.ci_low
            results[f"{name}_ci_high"] = estimate.ci_high
        return results

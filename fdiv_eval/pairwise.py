"""Divergences between audited models, estimated on the samples they already drew.

Natural logs, nats. Both models are normalized distributions over the same
token space, so no partition function enters. With x ∼ π_i:

- KL(π_i‖π_j) = E_{π_i}[log π_i − log π_j], a plain mean (row model's samples);
- JS(π_i, π_j) = ½·E_{π_i}[log(2π_i/(π_i + π_j))] + ½·E_{π_j}[log(2π_j/(π_i + π_j))],
  which uses both models' samples and is symmetric. Its standard error adds the
  two independent halves' variances.

Every model scores every other model's sample once, so N models cost N² − N
extra scoring passes.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from fdiv_eval.estimates import Estimate, mean_estimate, normal_estimate
from fdiv_eval.distributed import score_sharded
from fdiv_eval.sequences import SampleBatch

LOG_2 = math.log(2.0)


def cross_log_probs(models: dict, batches: dict[str, SampleBatch], batch_size: int,
                    progress: Callable[[int], None] | None = None) -> dict[tuple[str, str], np.ndarray]:
    """Return {(sampled_from, scored_by): log-probs} for every ordered pair of models.

    Under torchrun the rows of each batch are split across ranks and gathered on every rank.
    """
    scores = {}
    for sampled_from, batch in batches.items():
        for scored_by, model in models.items():
            scores[(sampled_from, scored_by)] = score_sharded(model, batch, batch_size, progress=progress).log_prob.numpy()
    return scores


def _half_js_terms(log_own: np.ndarray, log_other: np.ndarray) -> np.ndarray:
    # log(2π/(π + π')) = log 2 − log(1 + π'/π), computed as log 2 − softplus(log π' − log π).
    return LOG_2 - np.logaddexp(0.0, log_other - log_own)


def js_between(scores: dict, first: str, second: str) -> Estimate:
    """Jensen–Shannon divergence between two models from both models' samples."""
    first_terms = _half_js_terms(scores[(first, first)], scores[(first, second)])
    second_terms = _half_js_terms(scores[(second, second)], scores[(second, first)])
    first_half, second_half = mean_estimate(first_terms), mean_estimate(second_terms)
    value = 0.5 * (first_half.value + second_half.value)
    standard_error = 0.5 * math.sqrt(first_half.standard_error**2 + second_half.standard_error**2)
    estimate = normal_estimate(value, standard_error, first_half.n + second_half.n, "two-sample-mean+clt")
    return Estimate(**{**estimate.__dict__, "ci_low": max(estimate.ci_low, 0.0),
                       "ci_high": min(estimate.ci_high, LOG_2)})


def kl_between(scores: dict, first: str, second: str) -> Estimate:
    """KL(π_first‖π_second) from the first model's samples."""
    estimate = mean_estimate(scores[(first, first)] - scores[(first, second)], method="samples-of-first+clt")
    return Estimate(**{**estimate.__dict__, "ci_low": max(estimate.ci_low, 0.0)})


def pairwise_matrices(scores: dict, names: list[str]) -> dict:
    """Build the KL (row‖column) and JS matrices as nested lists of Estimate dicts.

    Diagonal entries are exactly 0. The result is the ``pairwise`` section of
    report.json.
    """
    kl_rows, js_rows = [], []
    for row in names:
        kl_row, js_row = [], []
        for column in names:
            if row == column:
                zero = Estimate(0.0, 0.0, 0.0, 0.0, 0, "identical").to_dict()
                kl_row.append(zero)
                js_row.append(zero)
                continue
            kl_row.append(kl_between(scores, row, column).to_dict())
            js_row.append(js_between(scores, row, column).to_dict())
        kl_rows.append(kl_row)
        js_rows.append(js_row)
    return {
        "models": list(names),
        "kl": kl_rows,
        "js": js_rows,
        "description": "kl[i][j] = KL(model_i‖model_j) from model i's samples; js[i][j] = Jensen–Shannon "
                       "divergence from both models' samples; nats",
    }

"""Audit samples that the audit's own sampler did not draw.

The audit's estimators assume x ∼ π, the audited model, drawn by pure
ancestral sampling. Samples from anywhere else (another decoding setting,
greedy or top-k decoding, a data set, another model) are from some proposal q,
and averaging per-sample terms over them estimates the wrong expectation:
greedy "samples" of π = [0.4, 0.3, 0.3] against π0 = [0.6, 0.2, 0.2] average
log π/π0 = −0.405 where KL(π‖π0) = 0.081. So these functions reject external
samples unless each comes with its log-prob under the proposal that drew it,
and then reweight by self-normalized importance weights π/q.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fdiv_eval.errors import InvalidInputError
from fdiv_eval.estimates import Estimate
from fdiv_eval.estimators import KL_ESTIMATORS, kl_to_base
from fdiv_eval.sequences import SampleBatch, score

logger = logging.getLogger(__name__)


def audit_external_samples(
    policy, base, batch: SampleBatch, proposal_log_probs, batch_size: int = 256
) -> dict[str, Estimate]:
    """Estimate KL(π‖π0) of ``policy`` from samples that another sampler drew.

    ``proposal_log_probs`` contains log q(x) of each sample under the
    distribution that drew it (for samples of ``policy`` drawn ancestrally,
    its own log-probs). ``None`` raises InvalidInputError: there is no way to
    tell from the samples alone which distribution they follow. Returns
    ``kl_to_base`` (plain log-ratio terms) and ``kl_to_base_k3`` (the
    non-negative r − 1 − log r terms), both self-normalized importance
    sampling estimates with their effective sample size.
    NOTE: a proposal that gives zero mass to part of π's support (greedy or
    top-k decoding) biases both estimates, whatever the weights; only the ESS
    and Pareto k̂ hint at it.
    """
    if proposal_log_probs is None:
        raise InvalidInputError(
            "these samples were not drawn by the audit's own sampler, so their distribution is unknown; "
            "pass proposal_log_probs (log q(x) of each sample under the sampler that drew it), "
            "or let the audit draw the samples"
        )
    log_proposal = _proposal_log_probs(proposal_log_probs, len(batch))
    log_policy = score(policy, batch, batch_size=batch_size).log_prob.numpy()
    log_base = score(base, batch, batch_size=batch_size).log_prob.numpy()
    lengths = batch.lengths.numpy()
    metrics = {}
    for estimator in KL_ESTIMATORS:
        name = "kl_to_base" if estimator == "plain" else f"kl_to_base_{estimator}"
        metrics[name] = kl_to_base(log_policy, log_base, estimator, log_proposal=log_proposal, lengths=lengths)
    logger.info("audited %d external samples; ESS %.1f", len(batch), metrics["kl_to_base"].effective_sample_size or 0)
    return metrics


def _proposal_log_probs(values, count: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size != count:
        raise InvalidInputError(f"got {values.size} proposal log-probs for {count} samples; give one per sample")
    if np.isnan(values).any() or (values > 0).any() or np.isneginf(values).any():
        raise InvalidInputError(
            "proposal_log_probs must be finite log-probabilities (≤ 0): a sample cannot have been drawn "
            "with probability 0 or above 1"
        )
    return values

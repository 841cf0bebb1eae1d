"""Audit causal-LM checkpoints against a target: sample, score, estimate.

Natural logs, nats. One audit run draws an independent base-model sample
once (for log Ẑ and the forward-KL cross-check) and then, for each model, a
fresh policy sample. Every model's metrics are ``Estimate`` objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from fdiv_eval.divergences import DIVERGENCES, alpha_divergence
from fdiv_eval.diversity import distinct_n, distinct_n_per_sample, self_bleu
from fdiv_eval.errors import InvalidInputError
from fdiv_eval.estimates import Estimate, mean_estimate
from fdiv_eval.estimators import (
    constraint_satisfaction,
    forward_kl_from_base,
    kl_to_base,
    log_partition,
    policy_divergence,
    require_accepted_samples,
    require_finite_log_partition,
    reverse_kl_on_support,
)
from fdiv_eval.distributed import current, map_sharded, sample_sharded, score_pair_sharded, score_sharded
from fdiv_eval.sequences import SampleBatch, default_prompt, model_dtype
from fdiv_eval.suite import AuditConfig
from fdiv_eval.target_metrics import base_sample_target_metrics, policy_target_metrics
from fdiv_eval.targets import PointwiseTarget

logger = logging.getLogger(__name__)

ProgressFactory = Callable[[str, int], Callable[[int], None]]
"""Starts a progress task (description, total) and returns its advance(n) callable."""


def _silent_progress(description: str, total: int) -> Callable[[int], None]:
    logger.info("%s (%d)", description, total)
    return lambda count: None


@dataclass
class BaseSample:
    """The independent base-model sample that every model's audit shares."""

    batch: SampleBatch
    texts: list[str]
    log_base: np.ndarray
    log_potential: np.ndarray
    log_partition: Estimate
    target_metrics: dict[str, Estimate] = field(default_factory=dict)
    """Target-only quantities estimated on this sample, such as E_p[r] and E_p[φ_k]."""


@dataclass
class ModelAudit:
    """One audited model: its metrics and its scored samples."""

    name: str
    model: str
    metrics: dict[str, Estimate]
    samples: dict[str, list]
    """Column name → values, one entry per policy sample (see ``save_samples``)."""
    log_prob_on_base_sample: np.ndarray
    batch: SampleBatch | None
    """The policy sample itself, kept for the pairwise divergences (None for prompted audits)."""
    info: dict = field(default_factory=dict)


def _decode(tokenizer, batch: SampleBatch) -> list[str]:
    # Pad and EOS are special tokens, so skipping them cuts each row at its length.
    return tokenizer.batch_decode(batch.sequences.tolist(), skip_special_tokens=True)


def draw_base_sample(
    base, tokenizer, target: PointwiseTarget, config: AuditConfig, max_new_tokens: int,
    progress: ProgressFactory | None = None,
) -> BaseSample:
    """Sample the base model, score it and estimate log Z.

    Raises EstimationError when no sample satisfies the constraint, because
    then Z (and every divergence to the target) cannot be estimated.

    Under torchrun each rank draws and scores its share, and every rank gets
    the whole sample; the target-only metrics are computed on rank 0 alone.
    """
    progress = progress or _silent_progress
    prompt = default_prompt(tokenizer)
    advance = progress("sampling the base model for log Z", config.base_samples)
    batch = sample_sharded(base, prompt, config.base_samples, max_new_tokens, tokenizer.eos_token_id,
                           tokenizer.pad_token_id, batch_size=config.batch_size, seed=config.seed, progress=advance)
    advance = progress("scoring the base sample", config.base_samples)
    log_base = score_sharded(base, batch, batch_size=config.batch_size, progress=advance).log_prob.numpy()
    texts = _decode(tokenizer, batch)
    log_potential = map_sharded(target.log_potential, texts)
    estimate = log_partition(log_potential)
    hint = ("raise audit.base_samples, or choose a target constraint that the base model satisfies more often")
    if getattr(target, "has_constraint", True):
        require_accepted_samples(map_sharded(target.constraint, texts), target.constraint_description, hint)
    require_finite_log_partition(estimate, hint)
    extra = base_sample_target_metrics(target, texts, None, log_potential) if current().is_main else {}
    return BaseSample(batch, texts, log_base, log_potential, estimate, extra)


def audit_model(
    name: str,
    model_name: str,
    policy,
    base,
    tokenizer,
    target: PointwiseTarget,
    base_sample: BaseSample,
    config: AuditConfig,
    max_new_tokens: int,
    seed: int,
    progress: ProgressFactory | None = None,
) -> ModelAudit:
    """Sample ``policy`` and estimate every metric, each with its standard error and 95% CI.

    Under torchrun each rank samples and scores its share of the rows, and
    the per-sample statistics are gathered. Rank 0 alone computes the
    estimates, so the other ranks return an audit with no metrics.
    """
    progress = progress or _silent_progress
    prompt = default_prompt(tokenizer)
    advance = progress(f"{name}: sampling", config.samples)
    batch = sample_sharded(policy, prompt, config.samples, max_new_tokens, tokenizer.eos_token_id,
                           tokenizer.pad_token_id, batch_size=config.batch_size, seed=seed, progress=advance)

    advance = progress(f"{name}: scoring", config.samples + len(base_sample.batch))
    policy_scores, base_scores, token_kl = score_pair_sharded(policy, base, batch, config.batch_size,
                                                              progress=advance)
    if policy is base:
        # The base sample was already scored by this very model.
        log_prob_on_base = base_sample.log_base
        advance(len(base_sample.batch))
    else:
        log_prob_on_base = score_sharded(policy, base_sample.batch, config.batch_size,
                                         progress=advance).log_prob.numpy()

    texts = _decode(tokenizer, batch)
    satisfied = map_sharded(target.constraint, texts).astype(bool)
    log_potential = map_sharded(target.log_potential, texts).astype(np.float64)
    if not current().is_main:
        return ModelAudit(name, model_name, {}, {}, log_prob_on_base, batch)
    log_policy = policy_scores.log_prob.numpy()
    log_base = base_scores.log_prob.numpy()
    log_ratios = log_policy - (log_base + log_potential)
    lengths = batch.lengths.numpy().astype(np.float64)
    log_z = base_sample.log_partition

    metrics: dict[str, Estimate] = {}
    for divergence_name, divergence in DIVERGENCES.items():
        metrics[divergence_name] = policy_divergence(divergence, log_ratios, log_z)
    for alpha in config.alphas:
        metrics[alpha_metric_name(alpha)] = policy_divergence(alpha_divergence(alpha), log_ratios, log_z)
    metrics["reverse_kl_on_support"] = reverse_kl_on_support(log_ratios, log_z)
    metrics["forward_kl_from_base"] = forward_kl_from_base(
        base_sample.log_potential, base_sample.log_base - log_prob_on_base
    )
    if getattr(target, "has_constraint", True):
        metrics["constraint_satisfaction"] = constraint_satisfaction(satisfied)
    metrics.update(policy_target_metrics(target, texts, None, log_policy, log_base))
    metrics.update(base_sample.target_metrics)
    metrics["kl_to_base"] = kl_to_base(log_policy, log_base, "plain")
    metrics["kl_to_base_k3"] = kl_to_base(log_policy, log_base, "k3")
    metrics["kl_to_base_tokenwise"] = mean_estimate(token_kl.numpy())
    metrics["sequence_entropy"] = mean_estimate(-log_policy)
    metrics["mean_token_entropy"] = mean_estimate(policy_scores.token_entropy_sum.numpy() / lengths)

    advance = progress(f"{name}: diversity", 1)
    for n in (1, 2, 3):
        metrics[f"distinct_{n}"] = distinct_n(texts, n, config.bootstrap_resamples, seed=seed)
        metrics[f"distinct_{n}_per_sample"] = distinct_n_per_sample(texts, n)
    metrics["self_bleu"] = self_bleu(texts, config.self_bleu_samples, seed=seed)
    metrics["mean_length"] = mean_estimate(lengths)
    advance(1)

    samples = {
        "text": texts,
        "token_ids": [row[:length] for row, length in zip(batch.sequences.tolist(), batch.lengths.tolist())],
        "length": batch.lengths.tolist(),
        "log_prob": log_policy.tolist(),
        "log_prob_base": log_base.tolist(),
        "constraint": satisfied.tolist(),
        "log_potential": log_potential.tolist(),
        "token_kl_to_base": token_kl.numpy().tolist(),
        "token_entropy_sum": policy_scores.token_entropy_sum.numpy().tolist(),
    }
    violations = int(np.count_nonzero(~np.isfinite(log_ratios)))
    info = {"violations": violations, "violation_rate": violations / len(texts)}
    warnings = precision_warnings(policy, base)
    if warnings:
        info["warnings"] = warnings
    return ModelAudit(name, model_name, metrics, samples, log_prob_on_base, batch, info)


def check_same_tokenizer(name: str, model_path: str, base_tokenizer, trust_remote_code: bool = False) -> None:
    """Raise InvalidInputError when a checkpoint's tokenizer differs from the base model's.

    Log-probabilities of two models are comparable only over the same token
    sequences, so every audited checkpoint must share the base tokenizer.
    """
    from fdiv_eval.sequences import load_tokenizer

    tokenizer = load_tokenizer(model_path, trust_remote_code)
    if tokenizer.get_vocab() != base_tokenizer.get_vocab():
        raise InvalidInputError(
            f"model {name!r} ({model_path}) has another tokenizer than the base model (vocabulary "
            f"{len(tokenizer):,} vs {len(base_tokenizer):,}); audit only checkpoints fine-tuned from the suite's base_model"
        )


def alpha_metric_name(alpha: float) -> str:
    return f"alpha_{alpha:g}"


def attach_exact_values(audit: ModelAudit, exact: dict[str, float]) -> None:
    """Store each metric's exact value in its Estimate (metrics without one are left as they are)."""
    for name, estimate in audit.metrics.items():
        if name in exact:
            audit.metrics[name] = replace(estimate, exact=exact[name])


def precision_warnings(policy, base) -> list[str]:
    """Return a warning, also logged, when the policy's and the base model's weights differ in dtype.

    Two copies of one model loaded in different dtypes give slightly
    different log-probs, so their KL is not exactly 0 and the divergence
    estimates carry that rounding gap.
    """
    policy_dtype, base_dtype = model_dtype(policy), model_dtype(base)
    if policy_dtype == base_dtype:
        return []
    message = (
        f"the policy's weights are {str(policy_dtype).removeprefix('torch.')} and the base model's are "
        f"{str(base_dtype).removeprefix('torch.')}: log-ratios between them include rounding differences; "
        "load both in the same dtype for exact comparisons"
    )
    logger.warning(message)
    return [message]


def save_samples(columns: dict[str, list], path: Path) -> None:
    """Write sample columns to Parquet through ``datasets``, atomically.

    −∞ log-potentials (hard-constraint violations) are stored as -inf floats.
    """
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    Dataset.from_dict(columns).to_parquet(str(temporary))
    temporary.replace(path)


def base_sample_columns(base_sample: BaseSample, audits: list[ModelAudit]) -> dict[str, list]:
    """Columns of the shared base sample, with each audited model's log-prob on it."""
    batch = base_sample.batch
    columns = {
        "text": base_sample.texts,
        "token_ids": [row[:length] for row, length in zip(batch.sequences.tolist(), batch.lengths.tolist())],
        "length": batch.lengths.tolist(),
        "log_prob_base": base_sample.log_base.tolist(),
        "log_potential": base_sample.log_potential.tolist(),
    }
    for audit in audits:
        columns[f"log_prob__{audit.name}"] = audit.log_prob_on_base_sample.tolist()
    return columns


def seed_for_model(audit_seed: int, index: int) -> int:
    """Seed of the policy sample of the index-th audited model, distinct from the base sample's."""
    return audit_seed + 1000 * (index + 1)

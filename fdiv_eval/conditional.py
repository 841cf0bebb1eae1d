"""Audits conditioned on prompts: per-prompt targets, averaged over prompts.

Natural logs, nats. For each prompt c the audit draws base samples (for
log Ẑ_c) and policy samples from π(·|c), scores only the continuations, and
computes each metric per prompt. The reported value is the mean over prompts.
Its standard error and 95% interval come from the cluster bootstrap of
``fdiv_eval.prompts`` (prompts, then samples within each prompt), and each
resample re-estimates log Ẑ_c from its own base rows. Diversity metrics are computed on
the pooled samples of all prompts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from fdiv_eval.audit import ModelAudit, ProgressFactory, _decode, _silent_progress
from fdiv_eval.distributed import current, map_sharded, sample_sharded, score_pair_sharded, score_sharded
from fdiv_eval.divergences import DIVERGENCES
from fdiv_eval.diversity import distinct_n, self_bleu
from fdiv_eval.errors import EstimationError
from fdiv_eval.estimates import Z_95, Estimate, decode_float, encode_float, log_sum_exp
from fdiv_eval.estimators import log_partition
from fdiv_eval.prompts import Context, cluster_bootstrap, per_prompt_count, with_prompt
from fdiv_eval.sequences import SampleBatch
from fdiv_eval.suite import AuditConfig
from fdiv_eval.target_metrics import MOMENT_PREFIX, TARGET_MOMENT_PREFIX

logger = logging.getLogger(__name__)

EXTREMES_SHOWN = 3


def prompt_seed(seed: int, prompt_index: int) -> int:
    """Seed of one prompt's sample; distinct across prompts and across the per-model seeds of one audit."""
    return seed * 1_000_003 + prompt_index


@dataclass
class PromptBaseSample:
    """The base-model sample of one prompt."""

    context: Context
    batch: SampleBatch
    texts: list[str]
    log_base: np.ndarray
    log_potential: np.ndarray
    log_partition: Estimate
    target_values: np.ndarray
    """Per sample: the reward (reward targets), the features [n, K] (distributional) or nothing."""


def draw_conditional_base_sample(base, tokenizer, target, contexts: list[Context], config: AuditConfig,
                                 max_new_tokens: int, progress: ProgressFactory | None = None) -> list[PromptBaseSample]:
    """Sample the base model for every prompt and estimate each log Z_c."""
    progress = progress or _silent_progress
    count = per_prompt_count(config.base_samples, len(contexts))
    advance = progress("sampling and scoring the base model per prompt", count * len(contexts))
    samples = []
    for context in contexts:
        batch = sample_sharded(base, context.prompt_ids, count, max_new_tokens, tokenizer.eos_token_id,
                               tokenizer.pad_token_id, batch_size=config.batch_size,
                               seed=prompt_seed(config.seed, context.index))
        log_base = score_sharded(base, batch, batch_size=config.batch_size).log_prob.numpy()
        texts = _decode(tokenizer, batch)
        log_potential = map_sharded(with_prompt(target.log_potential, context.text), texts).astype(np.float64)
        estimate = log_partition(log_potential)
        if estimate.value == -math.inf:
            raise EstimationError(
                f"log Z cannot be estimated for prompt {context.index} ({context.text!r}): none of its {count} "
                "base-model samples has P(x) > 0; raise audit.base_samples or drop the prompt"
            )
        samples.append(PromptBaseSample(context, batch, texts, log_base, log_potential, estimate,
                                        map_sharded(with_prompt(lambda t, p: _target_values(target, t, p),
                                                                 context.text), texts)))
        advance(count)
    return samples


def _target_values(target, texts, prompts) -> np.ndarray:
    kind = getattr(target, "kind", "pointwise")
    if kind == "reward":
        return target.rewards(texts, prompts)
    if kind == "distributional":
        return target.feature_values(texts, prompts)
    return np.zeros(len(texts))


@dataclass
class _PromptPolicySample:
    texts: list[str]
    lengths: np.ndarray
    log_policy: np.ndarray
    log_base: np.ndarray
    log_potential: np.ndarray
    token_kl: np.ndarray
    entropy_sum: np.ndarray
    satisfied: np.ndarray
    target_values: np.ndarray
    log_policy_on_base: np.ndarray


def audit_conditional_model(
    name: str,
    model_name: str,
    policy,
    base,
    tokenizer,
    target,
    base_samples: list[PromptBaseSample],
    config: AuditConfig,
    max_new_tokens: int,
    seed: int,
    progress: ProgressFactory | None = None,
) -> ModelAudit:
    """Sample ``policy`` for every prompt and estimate each metric as a mean over prompts."""
    progress = progress or _silent_progress
    count = per_prompt_count(config.samples, len(base_samples))
    advance = progress(f"{name}: sampling and scoring per prompt", count * len(base_samples))
    per_prompt: list[_PromptPolicySample] = []
    for base_sample in base_samples:
        context = base_sample.context
        batch = sample_sharded(policy, context.prompt_ids, count, max_new_tokens, tokenizer.eos_token_id,
                               tokenizer.pad_token_id, batch_size=config.batch_size,
                               seed=prompt_seed(seed, context.index))
        policy_scores, base_scores, token_kl = score_pair_sharded(policy, base, batch, config.batch_size)
        on_base = score_sharded(policy, base_sample.batch, config.batch_size).log_prob.numpy()
        texts = _decode(tokenizer, batch)
        per_prompt.append(_PromptPolicySample(
            texts, batch.lengths.numpy().astype(np.float64), policy_scores.log_prob.numpy(),
            base_scores.log_prob.numpy(),
            map_sharded(with_prompt(target.log_potential, context.text), texts).astype(np.float64),
            token_kl.numpy(), policy_scores.token_entropy_sum.numpy(),
            map_sharded(with_prompt(target.constraint, context.text), texts).astype(bool),
            map_sharded(with_prompt(lambda t, p: _target_values(target, t, p), context.text), texts),
            on_base,
        ))
        advance(count)
    if not current().is_main:
        # Rank 0 alone computes the estimates from the gathered per-sample statistics.
        return ModelAudit(name, model_name, {}, {}, np.concatenate([p.log_policy_on_base for p in per_prompt]),
                          batch=None)

    statistics = _statistics(target, per_prompt, base_samples)
    policy_counts = [len(p.texts) for p in per_prompt]
    base_counts = [len(b.texts) for b in base_samples]
    metrics: dict[str, Estimate] = {}
    for index, (metric, statistic) in enumerate(statistics.items()):
        metrics[metric] = cluster_bootstrap(statistic, policy_counts, base_counts, config.bootstrap_resamples,
                                            seed=seed + index)

    pooled = [text for p in per_prompt for text in p.texts]
    for n in (1, 2, 3):
        metrics[f"distinct_{n}"] = distinct_n(pooled, n, config.bootstrap_resamples, seed=seed)
    metrics["self_bleu"] = self_bleu(pooled, config.self_bleu_samples)

    everything = np.arange(max(policy_counts + base_counts))
    rows = []
    for c, (policy_sample, base_sample) in enumerate(zip(per_prompt, base_samples)):
        row = {"prompt": base_sample.context.text, "log_partition": encode_float(base_sample.log_partition.value)}
        for metric, statistic in statistics.items():
            row[metric] = encode_float(statistic(c, everything[: policy_counts[c]], everything[: base_counts[c]]))
        rows.append(row)

    samples = {
        "prompt_index": [c for c, p in enumerate(per_prompt) for _ in p.texts],
        "prompt": [b.context.text for p, b in zip(per_prompt, base_samples) for _ in p.texts],
        "text": pooled,
        "length": np.concatenate([p.lengths for p in per_prompt]).astype(int).tolist(),
        "log_prob": np.concatenate([p.log_policy for p in per_prompt]).tolist(),
        "log_prob_base": np.concatenate([p.log_base for p in per_prompt]).tolist(),
        "constraint": np.concatenate([p.satisfied for p in per_prompt]).tolist(),
        "log_potential": np.concatenate([p.log_potential for p in per_prompt]).tolist(),
        "token_kl_to_base": np.concatenate([p.token_kl for p in per_prompt]).tolist(),
    }
    info = {"prompts": len(per_prompt), "samples_per_prompt": count, "base_samples_per_prompt": base_counts[0],
            "per_prompt": rows}
    # NOTE: batch is None because each prompt was sampled as its own batch, so
    # pairwise divergences between models are not computed for prompted suites.
    return ModelAudit(name, model_name, metrics, samples, np.concatenate([p.log_policy_on_base for p in per_prompt]),
                      batch=None, info=info)


def _self_normalized(values: np.ndarray, log_weights: np.ndarray) -> float | np.ndarray:
    shifted = np.exp(log_weights - log_weights.max())
    return (shifted @ values) / shifted.sum()


def _statistics(target, per_prompt: list[_PromptPolicySample], base_samples: list[PromptBaseSample]) -> dict:
    """Metric name → per-prompt statistic (prompt index, policy rows, base rows) → value."""

    def log_z(c: int, base_rows: np.ndarray) -> float:
        return log_sum_exp(base_samples[c].log_potential[base_rows]) - math.log(base_rows.size)

    statistics = {}
    for divergence_name, divergence in DIVERGENCES.items():
        def divergence_statistic(c, rows, base_rows, divergence=divergence):
            p = per_prompt[c]
            shifted = p.log_policy[rows] - p.log_base[rows] - p.log_potential[rows] + log_z(c, base_rows)
            with np.errstate(invalid="ignore"):
                terms = divergence.policy_term(torch.from_numpy(shifted)).numpy()
            return float(terms.mean())
        statistics[divergence_name] = divergence_statistic

    def forward_kl_from_base(c, rows, base_rows):
        b = base_samples[c]
        log_weights = b.log_potential[base_rows]
        gap = np.where(np.isfinite(log_weights),
                       log_weights + b.log_base[base_rows] - per_prompt[c].log_policy_on_base[base_rows], 0.0)
        return float(_self_normalized(gap, log_weights)) - log_z(c, base_rows)

    statistics["forward_kl_from_base"] = forward_kl_from_base
    if getattr(target, "has_constraint", True):
        statistics["constraint_satisfaction"] = lambda c, rows, _: float(per_prompt[c].satisfied[rows].mean())
    statistics["kl_to_base"] = lambda c, rows, _: float((per_prompt[c].log_policy[rows] - per_prompt[c].log_base[rows]).mean())
    statistics["kl_to_base_tokenwise"] = lambda c, rows, _: float(per_prompt[c].token_kl[rows].mean())
    statistics["sequence_entropy"] = lambda c, rows, _: float(-per_prompt[c].log_policy[rows].mean())
    statistics["mean_token_entropy"] = lambda c, rows, _: float(
        (per_prompt[c].entropy_sum[rows] / per_prompt[c].lengths[rows]).mean())
    statistics["mean_length"] = lambda c, rows, _: float(per_prompt[c].lengths[rows].mean())

    kind = getattr(target, "kind", "pointwise")
    if kind == "reward":
        beta = target.beta
        statistics["reward"] = lambda c, rows, _: float(per_prompt[c].target_values[rows].mean())
        statistics["target_reward"] = lambda c, _, base_rows: float(
            _self_normalized(base_samples[c].target_values[base_rows], base_samples[c].log_potential[base_rows]))
        statistics["rlhf_objective"] = lambda c, rows, _: float(
            (per_prompt[c].target_values[rows]
             - beta * (per_prompt[c].log_policy[rows] - per_prompt[c].log_base[rows])).mean())
    if kind == "distributional":
        for k, feature_name in enumerate(target.names):
            statistics[MOMENT_PREFIX + feature_name] = (
                lambda c, rows, _, k=k: float(per_prompt[c].target_values[rows, k].mean()))
            statistics[TARGET_MOMENT_PREFIX + feature_name] = (
                lambda c, _, base_rows, k=k: float(_self_normalized(
                    base_samples[c].target_values[base_rows, k], base_samples[c].log_potential[base_rows])))
    return statistics


def prompt_extremes(rows: list[dict], metric: str, shown: int = EXTREMES_SHOWN) -> dict:
    """Return the prompts with the lowest and highest per-prompt value of ``metric``, as (prompt, value) pairs."""
    values = [(row["prompt"], float(decode_float(row[metric]))) for row in rows if metric in row]
    ordered = sorted((pair for pair in values if math.isfinite(pair[1])), key=lambda pair: pair[1])
    return {"lowest": ordered[:shown], "highest": ordered[::-1][:shown]}


def conditional_base_columns(base_samples: list[PromptBaseSample], audits: list[ModelAudit]) -> dict[str, list]:
    """Columns of the per-prompt base samples, with each audited model's log-prob on them."""
    columns = {
        "prompt_index": [b.context.index for b in base_samples for _ in b.texts],
        "text": [text for b in base_samples for text in b.texts],
        "length": np.concatenate([b.batch.lengths.numpy() for b in base_samples]).tolist(),
        "log_prob_base": np.concatenate([b.log_base for b in base_samples]).tolist(),
        "log_potential": np.concatenate([b.log_potential for b in base_samples]).tolist(),
    }
    for audit in audits:
        columns[f"log_prob__{audit.name}"] = audit.log_prob_on_base_sample.tolist()
    return columns


def mean_log_partition(base_samples: list[PromptBaseSample]) -> Estimate:
    """Mean over prompts of log Ẑ_c, with the standard error of independent per-prompt estimates."""
    values = np.array([b.log_partition.value for b in base_samples])
    errors = np.array([b.log_partition.standard_error for b in base_samples])
    errors = np.where(np.isfinite(errors), errors, 0.0)
    value = float(values.mean())
    standard_error = float(math.sqrt((errors**2).sum()) / len(base_samples))
    return Estimate(value, standard_error, value - Z_95 * standard_error, value + Z_95 * standard_error,
                    int(sum(len(b.texts) for b in base_samples)), "mean-over-prompts(log Z_c)")

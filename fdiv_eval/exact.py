"""Exact metrics by enumerating every sequence of a small sequence space.

With a vocabulary of V tokens, one of them EOS, and horizon T, a continuation
is k − 1 non-EOS tokens followed by EOS (k = 1..T), or T non-EOS tokens, so
there are Σ_{k<T} (V−1)^k + (V−1)^T sequences. Each is scored through the
same ``score_pair`` code path and the same target as sampled sequences, so
the exact values check the whole audit, not only the estimator formulas.

Natural logs, nats; sums over sequences in float64. Load the models in
float64 for exact values: in float32, Σ_x π(x) is off 1 by about 1e-6.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fdiv_eval.divergences import DIVERGENCES, alpha_divergence
from fdiv_eval.errors import InvalidInputError
from fdiv_eval.sequences import SampleBatch, score_pair

DEFAULT_LIMIT = 1_000_000


def count_sequences(vocab_size: int, horizon: int) -> int:
    """Number of distinct continuations of at most ``horizon`` tokens, EOS-terminated or full length."""
    words = vocab_size - 1
    return sum(words**k for k in range(horizon)) + words**horizon


def enumerate_sequences(vocab_size: int, eos_token_id: int, horizon: int, prompt_ids: torch.Tensor,
                        pad_token_id: int, limit: int = DEFAULT_LIMIT) -> SampleBatch:
    """Return every continuation as a right-padded batch; raise when there are more than ``limit``."""
    count = count_sequences(vocab_size, horizon)
    if count > limit:
        raise InvalidInputError(
            f"exact mode would enumerate {count:,} sequences (vocabulary {vocab_size}, max_new_tokens {horizon}), "
            f"over the limit of {limit:,}: lower max_new_tokens or raise the exact limit"
        )
    words = np.array([token for token in range(vocab_size) if token != eos_token_id], dtype=np.int64)
    rows, lengths = [], []
    for length in range(1, horizon + 1):
        # All (V−1)^(length−1) word prefixes, then EOS.
        prefixes = _all_words(words, length - 1)
        block = np.full((prefixes.shape[0], horizon), pad_token_id, dtype=np.int64)
        block[:, : length - 1] = prefixes
        block[:, length - 1] = eos_token_id
        rows.append(block)
        lengths.append(np.full(prefixes.shape[0], length))
    full = _all_words(words, horizon)
    rows.append(full)
    lengths.append(np.full(full.shape[0], horizon))
    return SampleBatch(prompt_ids, torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(lengths)))


def _all_words(words: np.ndarray, length: int) -> np.ndarray:
    if length == 0:
        return np.zeros((1, 0), dtype=np.int64)
    grids = np.meshgrid(*([words] * length), indexing="ij")
    return np.stack([grid.reshape(-1) for grid in grids], axis=1)


def exact_metrics(policy, base, tokenizer, target, horizon: int, prompt_ids: torch.Tensor,
                  batch_size: int = 4096, limit: int = DEFAULT_LIMIT, alphas=()) -> dict[str, float]:
    """Compute log Z, every divergence to the target and the model-only metrics exactly.

    Returns metric name → exact value, with the same names the audit uses,
    plus ``log_partition``.
    """
    batch = enumerate_sequences(len(tokenizer), tokenizer.eos_token_id, horizon, prompt_ids,
                                tokenizer.pad_token_id, limit)
    policy_scores, base_scores, token_kl = score_pair(policy, base, batch, batch_size)
    texts = tokenizer.batch_decode(batch.sequences.tolist(), skip_special_tokens=True)
    return exact_metrics_from_scores(
        policy_scores.log_prob.numpy(), base_scores.log_prob.numpy(), target.log_potential(texts),
        target.constraint(texts), token_kl.numpy(), policy_scores.token_entropy_sum.numpy(),
        batch.lengths.numpy().astype(np.float64), alphas,
    )


def exact_metrics_from_scores(log_policy, log_base, log_potential, satisfied, token_kl, entropy_sum,
                              lengths, alphas=()) -> dict[str, float]:
    """Exact metrics from per-sequence arrays over the whole sequence space."""
    log_unnormalized = log_base + log_potential
    log_z = _log_sum_exp(log_unnormalized)
    policy = np.exp(log_policy)
    log_target = log_unnormalized - log_z
    with np.errstate(invalid="ignore"):
        s = torch.tensor(log_policy - log_target)

    values = {"log_partition": log_z}
    for name, divergence in DIVERGENCES.items():
        terms = divergence.policy_term(s).numpy()
        values[name] = _weighted_sum(policy, terms)
    for alpha in alphas:
        values[f"alpha_{alpha:g}"] = _weighted_sum(policy, alpha_divergence(alpha).policy_term(s).numpy())
    inside = np.isfinite(log_target)
    mass_inside = policy[inside].sum()
    restricted = log_policy[inside] - math.log(mass_inside)
    values["reverse_kl_on_support"] = float((np.exp(restricted) * (restricted - log_target[inside])).sum())
    values["forward_kl_from_base"] = values["forward_kl"]
    values["constraint_satisfaction"] = float(policy[np.asarray(satisfied, dtype=bool)].sum())
    values["kl_to_base"] = float((policy * (log_policy - log_base)).sum())
    values["kl_to_base_tokenwise"] = float((policy * token_kl).sum())
    values["sequence_entropy"] = float(-(policy * log_policy).sum())
    values["mean_token_entropy"] = float((policy * entropy_sum / lengths).sum())
    values["mean_length"] = float((policy * lengths).sum())
    return values


def _log_sum_exp(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    peak = values.max()
    if not math.isfinite(peak):
        return float(peak)
    return float(peak + math.log(np.exp(values - peak).sum()))


def _weighted_sum(weights: np.ndarray, terms: np.ndarray) -> float:
    """Σ w·term, where an infinite term with positive weight makes the sum infinite."""
    if np.any(np.isinf(terms) & (weights > 0)):
        return math.inf
    return float((weights * terms).sum())

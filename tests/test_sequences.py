"""Sampling and scoring on the enumerable toy GPT-2 (4 tokens, EOS = pad = BOS)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fdiv_eval.errors import InvalidInputError
from fdiv_eval.sequences import (
    SampleBatch,
    load_model,
    resolve_model_path,
    sample,
    score,
    score_pair,
    sequence_log_probs_with_grad,
)
from conftest import TOY_EOS, enumerate_sequences, make_toy_model, sequences_to_batch

HORIZON = 3


def test_enumerated_probabilities_sum_to_one(toy_model):
    batch = sequences_to_batch(enumerate_sequences(HORIZON))
    log_probs = score(toy_model, batch).log_prob
    assert log_probs.dtype == torch.float64
    # float32 log-softmax, float64 sums: 40 terms are good to about 1e-6.
    assert float(torch.logsumexp(log_probs, 0).exp()) == pytest.approx(1.0, abs=1e-5)


def test_log_prob_independent_of_batch_and_padding(toy_model):
    sequences = enumerate_sequences(HORIZON)
    together = score(toy_model, sequences_to_batch(sequences)).log_prob
    alone = torch.cat([score(toy_model, sequences_to_batch([s])).log_prob for s in sequences])
    reversed_order = score(toy_model, sequences_to_batch(sequences[::-1])).log_prob.flip(0)
    in_pairs = score(toy_model, sequences_to_batch(sequences), batch_size=2).log_prob
    for other in (alone, reversed_order, in_pairs):
        assert torch.allclose(together, other, atol=1e-6, rtol=0)


def test_tokens_after_length_do_not_count(toy_model):
    # Same continuation [1, EOS], padded with different garbage after its length.
    first = SampleBatch(torch.tensor([TOY_EOS]), torch.tensor([[1, TOY_EOS, 2, 3]]), torch.tensor([2]))
    second = SampleBatch(torch.tensor([TOY_EOS]), torch.tensor([[1, TOY_EOS, 3, 3]]), torch.tensor([2]))
    assert torch.equal(score(toy_model, first).log_prob, score(toy_model, second).log_prob)


def test_grad_scoring_matches_no_grad_scoring(toy_model):
    batch = sequences_to_batch(enumerate_sequences(HORIZON))
    with_grad = sequence_log_probs_with_grad(toy_model, batch)
    assert with_grad.requires_grad
    assert torch.allclose(with_grad.detach(), score(toy_model, batch).log_prob, atol=1e-12, rtol=0)


def _empirical_matches_model(model, draws: SampleBatch) -> float:
    """Chi-square goodness-of-fit p-value of sampled sequences against the model's exact probabilities."""
    sequences = enumerate_sequences(HORIZON)
    probabilities = score(model, sequences_to_batch(sequences)).log_prob.exp().numpy()
    index = {tuple(s): i for i, s in enumerate(sequences)}
    counts = np.zeros(len(sequences))
    for row, length in zip(draws.sequences.tolist(), draws.lengths.tolist()):
        counts[index[tuple(row[:length])]] += 1
    expected = probabilities / probabilities.sum() * counts.sum()
    return stats.chisquare(counts, expected).pvalue


def test_samples_follow_model_distribution(toy_model):
    draws = sample(toy_model, torch.tensor([TOY_EOS]), 6000, HORIZON, TOY_EOS, TOY_EOS, batch_size=1000, seed=0)
    assert int(draws.lengths.max()) <= HORIZON
    # A fixed seed: the p-value is a fixed number; above 0.001 unless sampling is warped.
    assert _empirical_matches_model(toy_model, draws) > 1e-3


def test_sampling_ignores_checkpoint_generation_config(toy_model):
    # A checkpoint configured for greedy, top-k decoding must still be sampled ancestrally.
    toy_model.generation_config.do_sample = False
    toy_model.generation_config.top_k = 1
    toy_model.generation_config.temperature = 0.2
    draws = sample(toy_model, torch.tensor([TOY_EOS]), 6000, HORIZON, TOY_EOS, TOY_EOS, batch_size=1000, seed=1)
    assert _empirical_matches_model(toy_model, draws) > 1e-3


def test_sampling_detects_a_warped_sampler(toy_model):
    # The goodness-of-fit check must be able to fail: samples of another model fail it.
    other = make_toy_model(seed=5, scale=3.0)
    draws = sample(other, torch.tensor([TOY_EOS]), 6000, HORIZON, TOY_EOS, TOY_EOS, batch_size=1000, seed=2)
    assert _empirical_matches_model(toy_model, draws) < 1e-6


def test_lengths_include_first_eos(toy_model):
    draws = sample(toy_model, torch.tensor([TOY_EOS]), 500, HORIZON, TOY_EOS, TOY_EOS, seed=3)
    for row, length in zip(draws.sequences.tolist(), draws.lengths.tolist()):
        body = row[:length]
        assert TOY_EOS not in body[:-1]
        assert body[-1] == TOY_EOS or length == HORIZON


def test_seeded_sampling_is_reproducible(toy_model):
    first = sample(toy_model, torch.tensor([TOY_EOS]), 50, HORIZON, TOY_EOS, TOY_EOS, seed=9)
    second = sample(toy_model, torch.tensor([TOY_EOS]), 50, HORIZON, TOY_EOS, TOY_EOS, seed=9)
    assert torch.equal(first.sequences, second.sequences)


def test_token_kl_sums_to_sequence_kl_in_expectation(toy_model):
    other = make_toy_model(seed=4, scale=2.0)
    batch = sequences_to_batch(enumerate_sequences(HORIZON))
    policy, base, token_kl = score_pair(toy_model, other, batch)
    probabilities = policy.log_prob.exp()
    sequence_kl = float((probabilities * (policy.log_prob - base.log_prob)).sum())
    tokenwise_kl = float((probabilities * token_kl).sum())
    assert tokenwise_kl == pytest.approx(sequence_kl, abs=1e-5)
    sequence_entropy = float(-(probabilities * policy.log_prob).sum())
    assert float((probabilities * policy.token_entropy_sum).sum()) == pytest.approx(sequence_entropy, abs=1e-5)


def test_embedded_model_loads():
    model = load_model("embedded:austen")
    assert not model.training
    assert model.config.n_layer == 4
    assert model.config.n_embd == 128


def test_missing_model_folder_is_rejected(tmp_path):
    with pytest.raises(InvalidInputError, match="not found: expected a folder with config.json"):
        resolve_model_path(str(tmp_path / "nothing-here"))

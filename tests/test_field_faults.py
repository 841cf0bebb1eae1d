"""Fault classes that recur in alignment and evaluation tools, each with a closed-form value.

Every divergence is called with keyword arguments, so a swapped direction
cannot pass silently. Values are in nats unless a test states another unit.
"""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fdiv_eval.audit import precision_warnings
from fdiv_eval.discrete import (
    f_divergence,
    js_distance,
    js_divergence,
    kl_divergence,
    l1_distance,
    neyman_chi2_divergence,
    pearson_chi2_divergence,
    total_variation_distance,
)
from fdiv_eval.diversity import distinct_n, distinct_n_per_sample, self_bleu
from fdiv_eval.errors import InvalidInputError
from fdiv_eval.estimates import clip_importance_weights, self_normalized_weights
from fdiv_eval.estimators import kl_terms, kl_to_base, mean_over_sequences
from fdiv_eval.external import audit_external_samples
from fdiv_eval.metrics import METRICS, require_same_convention
from fdiv_eval.perplexity import perplexity, perplexity_from_log_probs, text_token_log_probs
from fdiv_eval.sequences import (
    SampleBatch,
    length_mask,
    lengths_from_eos,
    load_model,
    masked_sum,
    sample,
    score,
    score_continuations,
    score_pair,
    token_log_probs,
    top_k_log_probs,
)
from trainers.losses import LOGGED_ESTIMATORS, fdpg_loss, pseudo_rewards
from conftest import TOY_EOS, make_toy_model, sequences_to_batch

# float32 log-softmax and float64 sums: values agree with the closed forms to about 1e-7.
MODEL_TOLERANCE = 1e-6


class TableLM(torch.nn.Module):
    """A causal LM whose next-token logits depend only on the current token: logits = table[token].

    It ignores attention masks and positions, like a bigram model, so every
    padded position still produces whatever its row of the table holds.
    """

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])


def bigram_lm(probabilities) -> TableLM:
    """A TableLM with next-token probabilities probabilities[current token]."""
    return TableLM(torch.log(torch.tensor(probabilities, dtype=torch.float64)))


def one_token_batch(tokens) -> SampleBatch:
    """Sequences of one token each, after the prompt token 0."""
    ids = torch.tensor(tokens, dtype=torch.long).reshape(-1, 1)
    return SampleBatch(torch.tensor([0]), ids, torch.ones(len(tokens), dtype=torch.long))


def test_samples_from_another_distribution():
    policy_probabilities = [0.4, 0.3, 0.3]
    base_probabilities = [0.6, 0.2, 0.2]
    policy = bigram_lm([policy_probabilities] * 3)
    base = bigram_lm([base_probabilities] * 3)

    # Exact expectation under π of both per-sample forms.
    log_policy = np.log(policy_probabilities)
    log_base = np.log(base_probabilities)
    plain = kl_terms(log_policy, log_base, "plain")
    k3 = kl_terms(log_policy, log_base, "k3")
    assert float(np.dot(policy_probabilities, plain)) == pytest.approx(0.081093, abs=1e-6)
    assert float(np.dot(policy_probabilities, k3)) == pytest.approx(0.081093, abs=1e-6)
    assert plain.min() < 0
    assert k3.min() >= 0

    # Greedy "samples" (token 0 only) give the wrong value when averaged as if drawn from π.
    greedy = one_token_batch([0] * 8)
    greedy_log_policy = score(policy, greedy).log_prob.numpy()
    greedy_log_base = score(base, greedy).log_prob.numpy()
    assert kl_to_base(greedy_log_policy, greedy_log_base).value == pytest.approx(-0.405465, abs=MODEL_TOLERANCE)
    with pytest.raises(InvalidInputError, match="pass proposal_log_probs"):
        audit_external_samples(policy, base, greedy, proposal_log_probs=None)

    # Samples from a uniform proposal, with their log q, give the right value.
    uniform = one_token_batch([0, 1, 2])
    metrics = audit_external_samples(policy, base, uniform, proposal_log_probs=[math.log(1 / 3)] * 3)
    assert metrics["kl_to_base"].value == pytest.approx(0.081093, abs=MODEL_TOLERANCE)
    assert metrics["kl_to_base_k3"].value == pytest.approx(0.081093, abs=MODEL_TOLERANCE)
    assert metrics["kl_to_base"].effective_sample_size == pytest.approx(1 / (0.4**2 + 0.3**2 + 0.3**2), rel=1e-5)
    assert "kl_to_base_k3" in METRICS


def test_logged_loss_is_optimized_loss(tmp_path, toy_checkpoint):
    from fdiv_eval.divergences import get_divergence
    from fdiv_eval.targets import PointwiseTarget, WordListFeature
    from trainers.fdpg import FDPGConfig, train_policy

    log_policy = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64, requires_grad=True)
    log_target = torch.tensor([-1.5, -1.5, -2.5], dtype=torch.float64)
    step = fdpg_loss(get_divergence("rlhf"), log_policy, log_target, log_partition=0.2, baseline="mean")
    record = step.log_record()
    assert record["train/loss"] == step.loss.item()
    step.loss.backward()
    # d loss / d log π_i = −A_i/B: the optimized tensor is the one logged.
    assert torch.allclose(log_policy.grad, -step.advantages / 3, atol=1e-15, rtol=0)
    assert record["train/pseudo_reward_mean"] == float(step.pseudo_rewards.mean())

    target = PointwiseTarget(WordListFeature(("a",)), epsilon=0.01)
    config = FDPGConfig(method="js", steps=1, batch_size=8, max_new_tokens=3, checkpoint_every=10,
                        log_partition_samples=64)
    train_policy(toy_checkpoint, target, config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    estimators = records[0]["estimators"]
    for key in records[0]:
        if key.startswith("train/") and key not in ("train/constraint_satisfaction", "train/mean_length",
                                                    "train/grad_norm", "train/learning_rate"):
            assert key in estimators, key
    assert estimators["train/kl_to_base"].startswith("kl-plain")
    assert estimators["train/loss"] == LOGGED_ESTIMATORS["train/loss"]


def test_divergence_directions_and_preset_gradients():
    p, q = [0.5, 0.5], [0.9, 0.1]
    assert kl_divergence(p=p, q=q) == pytest.approx(0.510826, abs=1e-6)
    assert kl_divergence(p=q, q=p) == pytest.approx(0.368064, abs=1e-6)
    assert pearson_chi2_divergence(p=p, q=q) == pytest.approx(1.777778, abs=1e-6)
    assert neyman_chi2_divergence(p=p, q=q) == pytest.approx(0.640000, abs=1e-6)
    assert float(f_divergence("reverse_kl", policy=p, target=q)) == pytest.approx(0.510826, abs=1e-6)
    assert float(f_divergence("forward_kl", policy=p, target=q)) == pytest.approx(0.368064, abs=1e-6)

    # π = softmax(θ) at θ = 0; the f-DPG gradient in exact expectation is
    # Σ_x π(x)·(−R(x))·∇θ log π(x), with R = −f′(π/p) from the preset.
    target = torch.tensor(q, dtype=torch.float64)
    expected = {"rlhf": [-0.549306, 0.549306], "gdc": [-0.4, 0.4]}
    claimed = {"rlhf": "reverse_kl", "gdc": "forward_kl"}
    from fdiv_eval.divergences import get_divergence

    for preset, gradient in expected.items():
        theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        log_policy = torch.log_softmax(theta, dim=0)
        rewards = pseudo_rewards(get_divergence(preset), log_policy.detach() - torch.log(target))
        surrogate = -(log_policy.exp().detach() * rewards * log_policy).sum()
        surrogate.backward()
        assert theta.grad.tolist() == pytest.approx(gradient, abs=1e-6), preset

        theta_exact = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        f_divergence(claimed[preset], policy=torch.softmax(theta_exact, dim=0), target=target).backward()
        assert torch.allclose(theta.grad, theta_exact.grad, atol=1e-12, rtol=0), preset


def test_model_log_prob_is_not_decoding_score():
    model = TableLM([[2.0, 1.0, 0.0]] * 3)
    batch = SampleBatch(torch.tensor([2]), torch.tensor([[0, 1]]), torch.tensor([2]))
    assert float(score(model, batch).log_prob[0]) == pytest.approx(-1.81521, abs=1e-5)

    log_probs, _ = token_log_probs(model, batch)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(1, 2), atol=1e-5, rtol=0)

    logits = torch.tensor([[2.0, 1.0, 0.0]] * 2)
    top_k = top_k_log_probs(logits, top_k=2)
    assert float(top_k[0, 0] + top_k[1, 1]) == pytest.approx(-1.62652, abs=1e-5)
    assert torch.allclose(top_k.exp().sum(-1), torch.ones(2), atol=1e-5, rtol=0)
    assert top_k[0, 2] == -math.inf


@pytest.mark.parametrize("fill", [1.0, 0.0, -1e9, math.nan, math.inf])
def test_pad_fill_never_reaches_masked_sum(fill):
    log_probs = torch.tensor([[-0.5, -1.0, fill, fill]])
    mask = length_mask(torch.tensor([2]), 4)
    assert float(-masked_sum(log_probs, mask)[0]) == 1.5

    # Through the scorer: the pad token's row of logits is the fill value,
    # so every position after the length predicts from a poisoned row.
    probabilities = torch.full((4, 4), 0.1, dtype=torch.float64)
    probabilities[0, 1], probabilities[0, 2:] = math.exp(-0.5), (1 - math.exp(-0.5) - 0.1) / 2
    probabilities[1, 2], probabilities[1, [0, 1, 3]] = math.exp(-1.0), (1 - math.exp(-1.0)) / 3
    table = torch.log(probabilities).float()
    table[3] = fill
    model = TableLM(table)
    batch = SampleBatch(torch.tensor([0]), torch.tensor([[1, 2, 3, 3]]), torch.tensor([2]))
    assert float(-score(model, batch).log_prob[0]) == pytest.approx(1.5, abs=MODEL_TOLERANCE)


def test_padding_and_empty_rows():
    # One sequence: real-token log-ratios [0.2, 0.1], then post-EOS positions.
    for width in (2, 4, 7, 30):
        log_ratios = torch.full((1, width), 0.3, dtype=torch.float64)
        log_ratios[0, :2] = torch.tensor([0.2, 0.1], dtype=torch.float64)
        assert float(masked_sum(log_ratios, length_mask(torch.tensor([2]), width))[0]) == pytest.approx(0.3, abs=1e-15)

    # 6 rows with KL 0.4 and 2 rows without a generated token.
    values = [0.4] * 6 + [0.0, 0.0]
    lengths = [3, 1, 5, 2, 2, 4, 0, 0]
    estimate = mean_over_sequences(values, lengths)
    assert estimate.value == pytest.approx(0.4, abs=1e-15)
    assert estimate.n == 6
    assert estimate.notes == ("2 of 8 sequences have no generated token and are excluded",)
    assert kl_to_base([0.4] * 8, [0.0] * 8, lengths=lengths).n == 6


def test_pad_equal_to_eos():
    A, B, EOS, OTHER_EOS = 5, 6, 0, 9
    log_probs = torch.tensor([[-1.2, -0.7, -0.3, -0.05, -0.05]], dtype=torch.float64)

    lengths = lengths_from_eos(torch.tensor([[A, B, EOS, EOS, EOS]]), EOS)
    assert lengths.tolist() == [3]
    assert float(masked_sum(log_probs, length_mask(lengths, 5))[0]) == pytest.approx(-2.2, abs=1e-15)

    # Two EOS ids: the first of either ends the sequence.
    lengths = lengths_from_eos(torch.tensor([[A, B, OTHER_EOS, EOS, EOS], [A, EOS, OTHER_EOS, EOS, EOS]]),
                               [EOS, OTHER_EOS])
    assert lengths.tolist() == [3, 2]

    # No EOS within max_new_tokens: every token counts.
    lengths = lengths_from_eos(torch.tensor([[A, B, A, B, A]]), [EOS, OTHER_EOS])
    assert lengths.tolist() == [5]
    assert float(masked_sum(log_probs, length_mask(lengths, 5))[0]) == pytest.approx(-2.3, abs=1e-15)

    # The sampler takes several EOS ids too.
    draws = sample(make_toy_model(scale=3.0), torch.tensor([TOY_EOS]), 200, 4, [TOY_EOS, 3], TOY_EOS, seed=0)
    for row, length in zip(draws.sequences.tolist(), draws.lengths.tolist()):
        assert not {TOY_EOS, 3} & set(row[: length - 1])
        assert row[length - 1] in (TOY_EOS, 3) or length == 4


def test_perplexity_independent_of_padding():
    # Tokens: 0 BOS, 1 x1, 2 x2, 3 x3, 4 z. Text A = BOS x1 x2 x3, text B = BOS x1 z z z z.
    probabilities = np.full((5, 5), 0.0)
    probabilities[0, 1] = math.exp(-1)
    probabilities[1, 2], probabilities[1, 4] = math.exp(-2), math.exp(-1)
    probabilities[2, 3] = math.exp(-3)
    probabilities[4, 4] = math.exp(-1)
    for row in probabilities:
        free = row == 0
        row[free] = (1 - row.sum()) / free.sum()
    model = bigram_lm(probabilities.tolist())
    text_a, text_b = [0, 1, 2, 3], [0, 1, 4, 4, 4, 4]

    # z (4) is also the pad id: masking by token value would drop B's tokens.
    for pad in (0, 4):
        for batch_size in (1, 2):
            for side in ("right", "left"):
                result = perplexity(model, [text_a, text_b], pad, batch_size=batch_size, padding_side=side)
                assert result.per_text_perplexity.tolist() == pytest.approx([7.3891, 2.7183], abs=1e-4)
                assert result.token_counts.tolist() == [3, 5]

    # A model that uses positions: left padding with position ids changes nothing.
    toy = make_toy_model(scale=3.0)
    rows = [[0, 1, 2, 3, 1], [0, 2], [0, 3, 3]]
    alone = [text_token_log_probs(toy, [row], pad_token_id=1)[0] for row in rows]
    for side in ("right", "left"):
        together = text_token_log_probs(toy, rows, pad_token_id=1, padding_side=side)
        for single, batched in zip(alone, together):
            assert np.allclose(single, batched, atol=1e-6, rtol=0)


def test_continuation_scored_after_context():
    model = bigram_lm([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.4, 0.4, 0.2]])
    a, b, c = 0, 1, 2
    short = score_continuations(model, [[a, a]], [[b, c]], pad_token_id=c)
    assert float(short[0]) == pytest.approx(-1.427116, abs=MODEL_TOLERANCE)
    long_context = [c, b, c, b, b, a, c, a, a]
    truncated = score_continuations(model, [long_context, [a, a]], [[b, c], [b, c]], pad_token_id=c, max_length=4)
    assert truncated.tolist() == pytest.approx([-1.427116] * 2, abs=MODEL_TOLERANCE)
    full = score_continuations(model, [long_context], [[b, c]], pad_token_id=c)
    assert float(full[0]) == pytest.approx(-1.427116, abs=MODEL_TOLERANCE)

    # With a positional model: left-padded rows score as alone, and as the prompted scorer does.
    toy = make_toy_model(scale=3.0)
    contexts, continuations = [[0, 1, 2, 3], [0], [0, 2]], [[3, 0], [1, 2, 0], [2]]
    batched = score_continuations(toy, contexts, continuations, pad_token_id=0)
    for row, (context, continuation) in enumerate(zip(contexts, continuations)):
        alone = score_continuations(toy, [context], [continuation], pad_token_id=0)
        prompted = score(toy, SampleBatch(torch.tensor(context), torch.tensor([continuation]),
                                          torch.tensor([len(continuation)]))).log_prob
        assert float(batched[row]) == pytest.approx(float(alone[0]), abs=MODEL_TOLERANCE)
        assert float(batched[row]) == pytest.approx(float(prompted[0]), abs=MODEL_TOLERANCE)


def test_perplexity_units_and_aggregation():
    mean_two = perplexity_from_log_probs([[-2.0, -2.0]])
    assert mean_two.per_text_perplexity[0] == pytest.approx(math.exp(2), abs=1e-12)
    assert mean_two.per_text_perplexity[0] != pytest.approx(4.0, abs=0.1)

    losses = perplexity_from_log_probs([[-1.0, -3.0]])
    assert losses.per_text_perplexity[0] == pytest.approx(7.3891, abs=1e-4)
    assert np.mean(np.exp([1.0, 3.0])) == pytest.approx(11.4019, abs=1e-4)

    result = perplexity_from_log_probs([[-1.0, -2.0, -3.0], [-1.0] * 5])
    assert result.per_text_perplexity.tolist() == pytest.approx([7.3891, 2.7183], abs=1e-4)
    assert result.corpus_perplexity == pytest.approx(3.9551, abs=1e-4)
    assert result.mean_per_text_perplexity == pytest.approx(5.0537, abs=1e-4)
    report = result.to_dict()
    assert report["corpus_perplexity"] == result.corpus_perplexity
    assert report["mean_per_text_perplexity"] == result.mean_per_text_perplexity
    assert "perplexity" not in report


def test_self_normalized_weights_any_float_dtype():
    expected = [0.705385, 0.259496, 0.035119]
    inputs = [
        np.array([-107, -108, -110], dtype=np.float32),
        np.array([-107, -108, -110], dtype=np.float64),
        torch.tensor([-107.0, -108.0, -110.0], dtype=torch.float32),
        torch.tensor([-107.0, -108.0, -110.0], dtype=torch.float64),
    ]
    for log_weights in inputs:
        weights = self_normalized_weights(log_weights)
        assert weights.normalized.dtype == np.float64
        assert weights.normalized.tolist() == pytest.approx(expected, abs=1e-6)
        assert weights.effective_sample_size == pytest.approx(1.7664, abs=1e-4)

    clipped = clip_importance_weights(np.log([0.5, 1.0, 2.0, 8.0]), max_weight=1.5)
    assert clipped.raw.tolist() == pytest.approx([0.5, 1.0, 2.0, 8.0], abs=1e-12)
    assert clipped.clipped.tolist() == pytest.approx([0.5, 1.0, 1.5, 1.5], abs=1e-12)
    assert clipped.clipped_fraction == 0.5


def test_js_tv_names_and_conventions():
    p, q = [0.5, 0.5], [0.9, 0.1]
    assert js_divergence(p=p, q=q) == pytest.approx(0.101749, abs=1e-6)
    assert js_distance(p=p, q=q) == pytest.approx(0.318982, abs=1e-6)
    assert js_divergence(p=p, q=q, base=2) == pytest.approx(0.146793, abs=1e-6)
    assert total_variation_distance(p=p, q=q) == pytest.approx(0.4, abs=1e-12)
    assert l1_distance(p=p, q=q) == pytest.approx(0.8, abs=1e-12)
    assert js_divergence(p=[1.0, 0.0], q=[0.0, 1.0]) == pytest.approx(math.log(2), abs=1e-12)

    def report(unit: str, method: str) -> dict:
        return {"conventions": "natural logs", "metrics": {"self_bleu": {"unit": unit, "description": "d"}},
                "models": [{"name": "m", "metrics": {"self_bleu": {"method": method}}}]}

    same = report("fraction", "self-bleu-4+clt,tokenizer=words")
    require_same_convention("self_bleu", (same, "m"), (report("fraction", "self-bleu-4+clt,tokenizer=words"), "m"))
    with pytest.raises(InvalidInputError, match="unit: 'fraction' vs '0-100'"):
        require_same_convention("self_bleu", (same, "m"), (report("0-100", "self-bleu-4+clt,tokenizer=words"), "m"))
    with pytest.raises(InvalidInputError, match="tokenizer=words' vs 'tokenizer=whitespace"):
        require_same_convention("self_bleu", (same, "m"), (report("fraction", "self-bleu+clt,tokenizer=whitespace"), "m"))


def test_precision_kl_to_self_and_bf16(toy_checkpoint):
    first, second = load_model(toy_checkpoint), load_model(toy_checkpoint)
    batch = sequences_to_batch([[1, 2, 0], [3, 0], [2, 2, 2]])
    first_log_probs, mask = token_log_probs(first, batch)
    second_log_probs, _ = token_log_probs(second, batch)
    per_position = (first_log_probs.exp() * (first_log_probs - second_log_probs)).sum(-1)
    assert torch.equal(per_position, torch.zeros_like(per_position))
    _, _, token_kl = score_pair(first, second, batch)
    assert torch.equal(token_kl, torch.zeros_like(token_kl))
    assert precision_warnings(first, second) == []

    half = load_model(toy_checkpoint, dtype=torch.bfloat16)
    half_log_probs, _ = token_log_probs(half, batch)
    assert half_log_probs.dtype == torch.float32
    assert torch.allclose(half_log_probs.exp().sum(-1), torch.ones(mask.shape), atol=1e-5, rtol=0)
    warnings = precision_warnings(first, half)
    assert len(warnings) == 1
    assert "float32" in warnings[0]
    assert "bfloat16" in warnings[0]


def test_distinct_n_corpus_and_per_sample():
    texts = ["a b a b", "a b c d"]
    assert distinct_n(texts, 1, tokenizer="whitespace").value == pytest.approx(0.5, abs=1e-12)
    assert distinct_n_per_sample(texts, 1, tokenizer="whitespace").value == pytest.approx(0.75, abs=1e-12)
    assert distinct_n(texts, 2, tokenizer="whitespace").value == pytest.approx(0.6667, abs=1e-4)
    assert distinct_n_per_sample(texts, 2, tokenizer="whitespace").value == pytest.approx(0.8333, abs=1e-4)
    assert distinct_n(texts, 2, tokenizer="whitespace").method.endswith("tokenizer=whitespace")
    assert distinct_n_per_sample(texts, 2).method.endswith("tokenizer=words")
    for n in (1, 2, 3):
        assert f"distinct_{n}" in METRICS
        assert f"distinct_{n}_per_sample" in METRICS


def test_self_bleu_leave_one_out():
    value = self_bleu(["a b", "a b c d"], max_order=1, tokenizer="whitespace").value
    assert value == pytest.approx(0.433940, abs=1e-6)
    assert self_bleu(["a b c d", "a b"], max_order=1, tokenizer="whitespace").value == value

    identical = ["the cat sat on the mat"] * 4
    assert self_bleu(identical).value == 1.0
    assert self_bleu(identical[:3] + ["the cat sat on the hat"]).value < 1.0

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(["a", "b", "c", "d", "e"], size=6)) for _ in range(40)]
    capped = self_bleu(texts, max_samples=10, seed=3)
    assert capped.n == 10
    assert capped.notes == ("computed on a random subset of 10 of 40 samples, seed 3",)
    assert self_bleu(texts[::-1], max_samples=10, seed=3).value == capped.value
    assert 0.0 < capped.value < 1.0


def _raises_invalid_input():
    toy = make_toy_model()
    batch = one_token_batch([0, 1])
    return [
        (lambda: score_continuations(toy, [[]], [[1]], pad_token_id=0), "row 0 has an empty context"),
        (lambda: score_continuations(toy, [[0]], [[]], pad_token_id=0), "row 0 has an empty continuation"),
        (lambda: score_continuations(toy, [[0]], [[1, 2]], pad_token_id=0, max_length=2), "raise max_length to at least 3"),
        (lambda: score_continuations(toy, [[0], [0]], [[1]], pad_token_id=0), "got 2 contexts and 1 continuations"),
        (lambda: perplexity(toy, [[0]], pad_token_id=0), "text 0 has 1 token"),
        (lambda: perplexity(toy, [[0, 1]], pad_token_id=0, padding_side="middle"), "padding_side must be"),
        (lambda: perplexity_from_log_probs([[0.5]]), "text 0 has log-probs that are NaN or above 0"),
        (lambda: top_k_log_probs(torch.zeros(3), top_k=4), "top_k must be between 1 and the vocabulary size 3"),
        (lambda: lengths_from_eos(torch.zeros(1, 2, dtype=torch.long), []), "eos_token_ids is empty"),
        (lambda: kl_terms([0.0], [0.0], "k2"), "unknown KL estimator 'k2'"),
        (lambda: mean_over_sequences([0.1, 0.2], [1]), "got 2 values and 1 lengths"),
        (lambda: kl_to_base([-1.0], [-1.0], log_proposal=[-1.0, -2.0]), "got 2 proposal log-probs for 1 samples"),
        (lambda: audit_external_samples(toy, toy, batch, proposal_log_probs=[0.0]), "got 1 proposal log-probs for 2"),
        (lambda: audit_external_samples(toy, toy, batch, proposal_log_probs=[0.0, 0.5]), "must be finite log-probabilities"),
        (lambda: kl_divergence(p=[0.5, 0.6], q=[0.5, 0.5]), "p must sum to 1"),
        (lambda: kl_divergence(p=[0.5, 0.5], q=[1.0]), "p has 2 outcomes and q has 1"),
        (lambda: kl_divergence(p=[-0.5, 1.5], q=[0.5, 0.5]), "finite non-negative probabilities"),
        (lambda: f_divergence("js", policy=[0.5, 0.5], target=[1.0]), "policy has 2 outcomes and target has 1"),
        (lambda: js_divergence(p=[0.5, 0.5], q=[0.5, 0.5], base=1), "base must be a positive number other than 1"),
        (lambda: distinct_n(["a"], 1, tokenizer="bpe"), "unknown tokenizer 'bpe'"),
        (lambda: self_bleu(["a", "b"], max_order=0), "max_order must be at least 1"),
        (lambda: self_bleu(["a", "b"], max_samples=1), "max_samples must be at least 2"),
    ]


def test_invalid_inputs_are_rejected():
    for call, message in _raises_invalid_input():
        with pytest.raises(InvalidInputError, match=message):
            call()
    with pytest.raises(ValueError, match="max_weight must be positive"):
        clip_importance_weights([0.0], max_weight=0.0)
    with pytest.raises(ValueError, match="log-weights must be finite or −inf"):
        self_normalized_weights([0.0, math.nan])


def test_distinct_bootstrap_matches_direct_resampling():
    # The vectorized bootstrap must give the same replicates as resampling texts one by one.
    from fdiv_eval.diversity import _bootstrap_distinct_ratios, _distinct_ratio, _ngrams, words

    rng = np.random.default_rng(3)
    vocabulary = ["a", "b", "c", "d", "e"]
    texts = [" ".join(rng.choice(vocabulary, size=rng.integers(0, 7))) for _ in range(40)]
    ngram_lists = [_ngrams(words(text), 2) for text in texts]
    fast = _bootstrap_distinct_ratios(ngram_lists, resamples=30, seed=11)
    direct_rng = np.random.default_rng(11)
    direct = []
    for _ in range(30):
        indices = direct_rng.integers(0, len(texts), size=len(texts))
        direct.append(_distinct_ratio([ngram_lists[i] for i in indices]))
    assert np.allclose(fast, np.asarray(direct), rtol=0, atol=1e-12, equal_nan=True)

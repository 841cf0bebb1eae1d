"""The f-DPG loss functions and the training loop."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import TOY_EOS, enumerate_sequences, make_toy_model, sequences_to_batch
from fdiv_eval.divergences import DIVERGENCES, alpha_divergence, get_divergence
from fdiv_eval.exact import exact_metrics
from fdiv_eval.errors import InvalidInputError
from fdiv_eval.sequences import default_prompt, load_model, load_tokenizer, score, sequence_log_probs_with_grad
from fdiv_eval.targets import PointwiseTarget, WordListFeature
from trainers.fdpg import FDPGConfig, train_policy
from trainers.losses import pseudo_rewards, subtract_baseline, surrogate_loss, update_log_partition


def test_mean_baseline():
    rewards = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    assert torch.equal(subtract_baseline(rewards, "mean"), torch.tensor([-2.0, -1.0, 3.0], dtype=torch.float64))


def test_leave_one_out_baseline():
    # Sample 0's baseline is the mean of 2 and 6, which is 4, and so on.
    rewards = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    expected = torch.tensor([1.0 - 4.0, 2.0 - 3.5, 6.0 - 1.5], dtype=torch.float64)
    assert torch.allclose(subtract_baseline(rewards, "leave_one_out"), expected)


def test_no_baseline_keeps_rewards():
    rewards = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert torch.equal(subtract_baseline(rewards, "none"), rewards)


def test_running_log_partition_pools_batches():
    log_sum, count = update_log_partition(-math.inf, 0, torch.log(torch.tensor([1.0, 3.0], dtype=torch.float64)))
    log_sum, count = update_log_partition(log_sum, count, torch.log(torch.tensor([2.0, 2.0], dtype=torch.float64)))
    assert count == 4
    assert log_sum - math.log(count) == pytest.approx(math.log(2.0), rel=1e-12)


def _toy_problem(epsilon: float):
    """The 40 sequences of the toy (horizon 3) with a base model and target P = π0·max(b, ε).

    b(x) = 1 when the continuation contains token 1.
    """
    sequences = enumerate_sequences(3)
    batch = sequences_to_batch(sequences)
    base = make_toy_model(seed=1, scale=2.0)
    log_base = score(base, batch).log_prob
    satisfied = torch.tensor([1 in s for s in sequences])
    log_potential = torch.where(
        satisfied, torch.tensor(0.0, dtype=torch.float64),
        torch.tensor(math.log(epsilon) if epsilon > 0 else -math.inf, dtype=torch.float64),
    )
    log_target = log_base + log_potential
    log_target = log_target - torch.logsumexp(log_target, 0)  # normalized: log p
    return batch, log_target


ALL_DIVERGENCES = [*sorted(DIVERGENCES), "alpha_0.5", "alpha_2"]


def _divergence(name):
    if name.startswith("alpha_"):
        return alpha_divergence(float(name.split("_")[1]))
    return DIVERGENCES[name]


@pytest.mark.parametrize("name", ALL_DIVERGENCES)
@pytest.mark.parametrize("epsilon", [0.1, 0.0])
@pytest.mark.parametrize("baseline", ["none", "mean"])
def test_surrogate_gradient_equals_exact_divergence_gradient(name, epsilon, baseline):
    divergence = _divergence(name)
    if epsilon == 0.0 and divergence.needs_full_support:
        pytest.skip("infinite divergence on a hard constraint")
    batch, log_target = _toy_problem(epsilon)

    # Exact D_f(π_θ‖p) = Σ_x π·policy_term(log π − log p), differentiated by autograd.
    policy = make_toy_model(seed=0, scale=2.0)
    log_policy = sequence_log_probs_with_grad(policy, batch)
    log_ratio = log_policy - log_target
    # Where p = 0 the term is a constant; keep autograd away from s = +∞,
    # where inf·0 would turn its zero gradient into NaN.
    finite = torch.isfinite(log_ratio)
    terms = torch.where(
        finite,
        divergence.policy_term(torch.where(finite, log_ratio, torch.zeros_like(log_ratio))),
        divergence.policy_term(torch.full_like(log_ratio, math.inf)).detach(),
    )
    exact = (log_policy.exp() * terms).sum()
    exact.backward()
    expected = [p.grad.clone() for p in policy.parameters()]

    # f-DPG: E_π[(R − b)·∇log π] with R = −f′(π/p), written as a mean over the
    # 40 enumerated sequences with weights 40·π(x).
    policy.zero_grad()
    log_policy = sequence_log_probs_with_grad(policy, batch)
    probabilities = log_policy.detach().exp()
    rewards = pseudo_rewards(divergence, log_policy.detach() - log_target)
    if baseline == "mean":
        # Any constant baseline leaves the expected gradient unchanged.
        rewards = rewards - float((probabilities * rewards).sum())
    advantages = rewards * probabilities * len(probabilities)
    surrogate_loss(advantages, log_policy).backward()
    for got, want in zip((p.grad for p in policy.parameters()), expected):
        # float32 log-softmax inside the model: agree to about 1e-5 relative.
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


FAMILY = WordListFeature(("mother", "father", "sister", "brother", "daughter"))


def test_reverse_kl_on_hard_constraint_is_rejected(tmp_path):
    target = PointwiseTarget(FAMILY, epsilon=0.0)
    with pytest.raises(InvalidInputError, match="infinite for a hard constraint"):
        train_policy("embedded:austen", target, FDPGConfig(method="rlhf"), tmp_path)


def _small_config(**overrides) -> FDPGConfig:
    settings = dict(method="gdc", steps=4, batch_size=8, max_new_tokens=8, checkpoint_every=2,
                    log_partition_samples=64, seed=3)
    settings.update(overrides)
    return FDPGConfig(**settings)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    target = PointwiseTarget(WordListFeature(("she", "he", "her")), epsilon=0.001)
    config = _small_config()
    train_policy("embedded:austen", target, config, tmp_path / "straight")
    train_policy("embedded:austen", target, config, tmp_path / "interrupted")

    # Simulate a crash after the step-2 checkpoint: the final checkpoint is gone.
    shutil.rmtree(tmp_path / "interrupted" / "final")
    result = train_policy("embedded:austen", target, config, tmp_path / "interrupted")
    assert result.resumed_from_step == 2
    assert result.steps_run == 2

    straight = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "interrupted" / "final" / "model.safetensors")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "interrupted" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_training_log_has_namespaced_metrics(tmp_path):
    target = PointwiseTarget(WordListFeature(("she", "he", "her")), epsilon=0.001)
    train_policy("embedded:austen", target, _small_config(steps=2, method="js"), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("train/loss", "train/pseudo_reward_mean", "train/log_partition", "train/constraint_satisfaction",
                "train/kl_to_base", "train/js_on_batch", "time/step_seconds"):
        assert key in records[0], key
    state = json.loads((tmp_path / "final" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["divergence"] == "js"
    model = load_model(str(tmp_path / "final"))
    assert model.config.n_layer == 4


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop"])
def test_other_optimizers_run(tmp_path, optimizer):
    target = PointwiseTarget(WordListFeature(("she", "he", "her")), epsilon=0.001)
    result = train_policy("embedded:austen", target, _small_config(steps=1, optimizer=optimizer), tmp_path)
    assert result.steps_run == 1


def _exact(model_path: str, base_path: str, target, horizon: int = 3) -> dict:
    tokenizer = load_tokenizer(base_path)
    policy = load_model(model_path, dtype=torch.float64)
    base = load_model(base_path, dtype=torch.float64)
    return exact_metrics(policy, base, tokenizer, target, horizon, default_prompt(tokenizer))


@pytest.mark.parametrize("method", ["gdc", "js", "rlhf", "tv"])
def test_training_lowers_its_own_divergence(tmp_path, toy_checkpoint, method):
    # The toy base gives about a third of its mass to sequences that contain "a".
    target = PointwiseTarget(WordListFeature(("a",)), epsilon=0.01)
    config = FDPGConfig(method=method, steps=40, batch_size=64, max_new_tokens=3, learning_rate=3e-3,
                        checkpoint_every=100, log_partition_samples=512, seed=0)
    result = train_policy(toy_checkpoint, target, config, tmp_path / "run")
    divergence = get_divergence(method).name
    before = _exact(toy_checkpoint, toy_checkpoint, target)
    after = _exact(str(result.final_checkpoint), toy_checkpoint, target)
    assert after[divergence] < 0.5 * before[divergence], (before[divergence], after[divergence])
    assert after["constraint_satisfaction"] > before["constraint_satisfaction"] + 0.2


def test_partial_checkpoints_are_skipped_with_warning(tmp_path, caplog):
    target = PointwiseTarget(WordListFeature(("she", "he", "her")), epsilon=0.001)
    config = _small_config(steps=2, checkpoint_every=1)
    train_policy("embedded:austen", target, config, tmp_path)
    # What a crash mid-write leaves: a staging folder, and a folder without its state file.
    (tmp_path / ".step-000003-abcd").mkdir()
    (tmp_path / "step-000004").mkdir()
    longer = _small_config(steps=3, checkpoint_every=1)
    with caplog.at_level("WARNING", logger="trainers.fdpg"):
        result = train_policy("embedded:austen", target, longer, tmp_path)
    assert result.resumed_from_step == 2
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert ".step-000003-abcd" in messages
    assert "step-000004: it has no trainer_state.json" in messages
    assert not (tmp_path / ".step-000003-abcd").exists()

"""The f-DPG loss as pure functions of per-sample tensors.

Natural logs. Shapes: B = batch size; every tensor here is [B] unless stated.

The f-DPG gradient of D_f(π_θ‖p) is E_{x∼π_θ}[f′(π_θ(x)/p(x))·∇_θ log π_θ(x)].
With the pseudo-reward R(x) = −f′(π_θ/p), held constant (detached), and a
baseline b, the surrogate loss −mean((R − b)·log π_θ(x)) has exactly that
gradient in expectation; the baseline only lowers its variance because
E_π[∇ log π] = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fdiv_eval.divergences import FDivergence


def log_ratio_to_target(log_policy: torch.Tensor, log_unnormalized_target: torch.Tensor,
                        log_partition: float | torch.Tensor) -> torch.Tensor:
    """Return log t = log π − log p = log π − log P + log Z (detached, float64).

    ``log_partition`` is one log Z, or one per sample [B] when samples come from different prompts.

    +∞ where P = 0: the target gives the sample no mass.
    """
    return log_policy.detach().double() - log_unnormalized_target.double() + log_partition


def pseudo_rewards(divergence: FDivergence, log_ratio: torch.Tensor) -> torch.Tensor:
    """Return R = −f′(t) from log t; finite wherever f′ has a finite limit."""
    return divergence.pseudo_reward(log_ratio)


def subtract_baseline(rewards: torch.Tensor, kind: str) -> torch.Tensor:
    """Return R − b for the batch-mean, leave-one-out or no baseline.

    The leave-one-out baseline of sample i is the mean of the other B − 1
    rewards, which keeps each sample's advantage independent of its own reward.
    """
    if kind == "none":
        return rewards
    if kind == "mean":
        return rewards - rewards.mean()
    if kind == "leave_one_out":
        count = rewards.numel()
        return rewards - (rewards.sum() - rewards) / (count - 1)
    raise ValueError(f"unknown baseline {kind!r}; choose mean, leave_one_out or none")


def surrogate_loss(advantages: torch.Tensor, log_policy: torch.Tensor) -> torch.Tensor:
    """Return −mean(A·log π_θ); its gradient is the f-DPG gradient estimate."""
    return -(advantages.detach().to(log_policy.dtype) * log_policy).mean()


def sharded_surrogate_loss(advantages: torch.Tensor, log_policy: torch.Tensor, total_count: int,
                           world_size: int) -> torch.Tensor:
    """Return one rank's part of the surrogate loss when N ranks share a batch of ``total_count`` samples.

    Rank r has rows S_r and returns −(N/total)·Σ_{i∈S_r} A_i·log π_θ(x_i).
    DistributedDataParallel averages the gradients of the N ranks, so the
    step's gradient is (1/N)·Σ_r ∇(rank r's loss) = −(1/total)·Σ_i A_i·∇log π_θ(x_i),
    the gradient of ``surrogate_loss`` on all the rows, whatever the share sizes.
    """
    return -(advantages.detach().to(log_policy.dtype) * log_policy).sum() * (world_size / total_count)


def update_log_partition(log_sum: float, count: int, log_weights: torch.Tensor) -> tuple[float, int]:
    """Fold a batch of importance log-weights log P − log q into a running log-sum.

    Returns the new (log Σw, count); log Ẑ = log Σw − log count. Every batch is
    an unbiased estimate of Z whatever proposal q it came from, so pooling all
    of them stays unbiased while the policy moves.
    """
    batch_log_sum = float(torch.logsumexp(log_weights.double(), dim=0))
    return float(torch.logaddexp(torch.tensor(log_sum, dtype=torch.float64), torch.tensor(batch_log_sum, dtype=torch.float64))), count + log_weights.numel()


LOGGED_ESTIMATORS = {
    "train/loss": "surrogate −mean((R − b)·log π_θ(x)), the tensor that is backpropagated",
    "train/pseudo_reward_mean": "mean of R = −f′(π_θ/p) over the batch, R as used in the loss",
    "train/pseudo_reward_std": "standard deviation (n − 1) of R over the batch",
    "train/log_partition": "running log Ẑ: logsumexp of all log P − log q so far, minus log count",
    "train/kl_to_base": "kl-plain: mean(log π_θ − log π0) over the batch, x ∼ π_θ",
}
"""Estimator of each quantity in a training log record, by key; every record stores it beside the values."""


@dataclass
class FDPGLoss:
    """The loss of one f-DPG step and the per-sample tensors it was built from."""

    loss: torch.Tensor
    """Scalar surrogate loss; its gradient is the f-DPG gradient estimate."""
    log_ratio: torch.Tensor
    """log t = log π_θ − log p per sample (detached, float64)."""
    pseudo_rewards: torch.Tensor
    advantages: torch.Tensor

    def log_record(self) -> dict[str, float]:
        """Return the logged values, read from the same tensors that the optimizer uses."""
        return {
            "train/loss": float(self.loss.detach()),
            "train/pseudo_reward_mean": float(self.pseudo_rewards.mean()),
            "train/pseudo_reward_std": float(self.pseudo_rewards.std()),
        }


def fdpg_loss(
    divergence: FDivergence,
    log_policy: torch.Tensor,
    log_unnormalized_target: torch.Tensor,
    log_partition: float | torch.Tensor,
    baseline: str,
    groups: list[int] | None = None,
) -> FDPGLoss:
    """Build the f-DPG surrogate loss of one batch: pseudo-rewards, baseline, loss.

    ``log_partition`` is one log Ẑ or one per sample (each prompt has its own
    Z_c). ``groups`` lists consecutive group sizes, one per prompt; the
    baseline is computed within each group. The training loop backpropagates
    ``loss`` and logs ``log_record()`` of the same object, so the logged loss
    is the optimized one by construction.
    """
    log_ratio = log_ratio_to_target(log_policy, log_unnormalized_target, log_partition)
    rewards = pseudo_rewards(divergence, log_ratio)
    groups = groups or [rewards.numel()]
    advantages = torch.cat([subtract_baseline(part, baseline) for part in torch.split(rewards, groups)])
    return FDPGLoss(surrogate_loss(advantages, log_policy), log_ratio, rewards, advantages)

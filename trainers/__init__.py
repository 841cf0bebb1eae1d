"""f-DPG trainer: fine-tune a causal LM toward a target by minimizing an f-divergence."""

from trainers.fdpg import FDPGConfig, TrainResult, train_policy

__all__ = ["FDPGConfig", "TrainResult", "train_policy"]

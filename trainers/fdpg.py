"""The f-DPG training loop, shared by every method.

RLHF (reverse KL), GDC (forward KL), Jensen–Shannon, total variation and the
rest of the f-divergence family differ only in the pseudo-reward −f′(π/p);
everything else is this one loop. Natural logs, nats.

Output folder layout (``output_dir``)::

    train_log.jsonl          one JSON record per step, namespaced keys
    step-000040/             resumable checkpoint: HF model + tokenizer,
                             trainer_state.json, optimizer_and_rng.pt
    final/                   the finished policy, same files

Each checkpoint is written to a temporary folder and renamed into place, so
an interrupted write never leaves a half-written checkpoint. A new run in the
same folder resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fdiv_eval.divergences import get_divergence
from fdiv_eval.errors import InvalidInputError
from fdiv_eval.estimators import (
    log_partition,
    policy_divergence,
    require_accepted_samples,
    require_finite_log_partition,
)
from fdiv_eval.estimates import Estimate, log_sum_exp
from fdiv_eval.sequences import (
    SampleBatch,
    default_prompt,
    load_model,
    load_tokenizer,
    sample,
    score,
    sequence_log_probs_with_grad,
)
from fdiv_eval.targets import PointwiseTarget
from trainers.losses import LOGGED_ESTIMATORS, fdpg_loss, update_log_partition

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TENSOR_STATE_FILE = "optimizer_and_rng.pt"
LOG_FILE = "train_log.jsonl"
FINAL_DIR = "final"


@dataclass(frozen=True)
class FDPGConfig:
    """Settings of one f-DPG run."""

    method: str
    """Preset (``rlhf``, ``gdc``) or divergence name."""
    alpha: float | None = None
    """α of the ``alpha`` divergence."""
    steps: int = 80
    batch_size: int = 128
    max_new_tokens: int = 32
    learning_rate: float = 2e-4
    optimizer: str = "adamw"
    """``adamw``, ``sgd`` or ``rmsprop``."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    baseline: str = "mean"
    """``mean``, ``leave_one_out`` or ``none``."""
    checkpoint_every: int = 40
    log_partition_samples: int = 2048
    """Base-model samples that start the running log Z estimate."""
    seed: int = 0
    suite_hash: str = ""
    """Hash of the suite that asked for this run; stored in every checkpoint."""


@dataclass
class TrainResult:
    final_checkpoint: Path
    steps_run: int
    resumed_from_step: int
    seconds: float
    last_metrics: dict


StepCallback = Callable[[int, int, dict], None]
"""Called after each step with (step, total_steps, metrics)."""


def _make_optimizer(config: FDPGConfig, parameters) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    raise InvalidInputError(f"unknown optimizer {config.optimizer!r}; choose adamw, sgd or rmsprop")


def _validate(config: FDPGConfig, target: PointwiseTarget) -> None:
    divergence = get_divergence(config.method, config.alpha)
    if divergence.needs_full_support and target.is_hard:
        raise InvalidInputError(
            f"method {config.method!r} minimizes {divergence.name}, which is infinite for a hard constraint "
            "(epsilon = 0): give the target a small positive epsilon such as 0.001"
        )
    for name in ("steps", "batch_size", "max_new_tokens", "checkpoint_every", "log_partition_samples"):
        if getattr(config, name) < 1:
            raise InvalidInputError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.batch_size < 2 and config.baseline == "leave_one_out":
        raise InvalidInputError("the leave_one_out baseline needs batch_size of at least 2")


def _latest_checkpoint(output_dir: Path) -> Path | None:
    """Return the complete checkpoint (``step-*`` or ``final``) with the highest step."""
    candidates = [p for p in [*output_dir.glob("step-*"), output_dir / FINAL_DIR] if (p / STATE_FILE).is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: json.loads((p / STATE_FILE).read_text())["step"])


def _write_checkpoint(folder: Path, policy, tokenizer, optimizer, state: dict) -> None:
    """Save model, tokenizer and trainer state into ``folder`` atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    staging.chmod(0o755)
    policy.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    torch.save(
        {"optimizer": optimizer.state_dict(), "torch_rng": torch.random.get_rng_state()},
        staging / TENSOR_STATE_FILE,
    )
    (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)


def _truncate_log(log_path: Path, last_step: int) -> None:
    """Drop log records written after the checkpoint being resumed."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        if line.strip() and json.loads(line).get("step", 0) <= last_step:
            kept.append(line)
    temporary = log_path.with_suffix(".tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, log_path)


def _initial_log_partition(base, tokenizer, target, prompt, config: FDPGConfig) -> tuple[float, int]:
    """Start the running log Z from an independent base-model sample."""
    batch = sample(
        base, prompt, config.log_partition_samples, config.max_new_tokens,
        tokenizer.eos_token_id, tokenizer.pad_token_id, seed=config.seed + 1,
    )
    texts = tokenizer.batch_decode(batch.sequences.tolist(), skip_special_tokens=True)
    log_potentials = target.log_potential(texts)
    hint = "raise train.log_partition_samples, or choose target words that the base model produces more often"
    require_accepted_samples(target.constraint(texts), target.feature.words, hint)
    require_finite_log_partition(log_partition(log_potentials), hint)
    return log_sum_exp(log_potentials), log_potentials.size


def train_policy(
    base_model: str,
    target: PointwiseTarget,
    config: FDPGConfig,
    output_dir: str | Path,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Fine-tune a copy of ``base_model`` toward ``target`` by f-DPG; resume if possible.

    Each step: sample a batch from the policy; score log π_θ (with grad) and
    log π0; fold the batch's log-weights into the running log Ẑ; compute the
    pseudo-reward −f′(t) from log t = log π_θ − log P + log Ẑ; subtract the
    baseline; take one clipped optimizer step on the surrogate loss.
    """
    _validate(config, target)
    divergence = get_divergence(config.method, config.alpha)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / LOG_FILE
    started = time.perf_counter()

    tokenizer = load_tokenizer(base_model)
    base = load_model(base_model)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    prompt = default_prompt(tokenizer)

    resume_from = _latest_checkpoint(output_dir)
    if resume_from is not None:
        state = json.loads((resume_from / STATE_FILE).read_text())
        if state.get("method") != config.method or state.get("suite_hash") != config.suite_hash:
            raise InvalidInputError(
                f"{output_dir} holds checkpoints of another run (method {state.get('method')!r}, "
                f"suite hash {state.get('suite_hash')!r}); delete the folder or choose another output folder"
            )
        policy = load_model(str(resume_from))
        optimizer = _make_optimizer(config, policy.parameters())
        tensors = torch.load(resume_from / TENSOR_STATE_FILE, weights_only=False)
        optimizer.load_state_dict(tensors["optimizer"])
        torch.random.set_rng_state(tensors["torch_rng"])
        start_step = int(state["step"])
        log_z_sum, log_z_count = float(state["log_partition_log_sum"]), int(state["log_partition_count"])
        _truncate_log(log_path, start_step)
        logger.info("resuming %s from step %d (%s)", config.method, start_step, resume_from.name)
    else:
        torch.manual_seed(config.seed)
        policy = load_model(base_model)
        optimizer = _make_optimizer(config, policy.parameters())
        start_step = 0
        log_z_sum, log_z_count = _initial_log_partition(base, tokenizer, target, prompt, config)
        if log_path.exists():
            log_path.unlink()

    # Dropout stays off while training, so the sampled distribution is the
    # one whose log-probs the loss differentiates.
    policy.eval()
    metrics: dict = {}

    def trainer_state(step: int) -> dict:
        return {
            "step": step,
            "method": config.method,
            "divergence": divergence.name,
            "alpha": config.alpha,
            "log_partition": log_z_sum - math.log(log_z_count),
            "log_partition_log_sum": log_z_sum,
            "log_partition_count": log_z_count,
            "suite_hash": config.suite_hash,
            "base_model": base_model,
            "target": target.describe(),
            "config": asdict(config),
        }

    for step in range(start_step + 1, config.steps + 1):
        step_started = time.perf_counter()

        # 1. Sample from the current policy.
        batch = sample(policy, prompt, config.batch_size, config.max_new_tokens,
                       tokenizer.eos_token_id, tokenizer.pad_token_id, batch_size=config.batch_size)

        # 2. Score: log π_θ with grad, log π0 without, and the target potential.
        log_policy = sequence_log_probs_with_grad(policy, batch)
        with torch.no_grad():
            log_base = score(base, batch, batch_size=config.batch_size).log_prob
        texts = tokenizer.batch_decode(batch.sequences.tolist(), skip_special_tokens=True)
        log_potential = torch.from_numpy(target.log_potential(texts))
        log_target = log_base + log_potential

        # 3. Running log Z from the on-policy importance weights P/π_θ.
        log_z_sum, log_z_count = update_log_partition(log_z_sum, log_z_count, log_target - log_policy.detach())
        log_z = log_z_sum - math.log(log_z_count)

        # 4-6. Pseudo-reward −f′(π_θ/p), baseline, surrogate loss; one clipped optimizer step.
        step_loss = fdpg_loss(divergence, log_policy, log_target, log_z, config.baseline)
        optimizer.zero_grad(set_to_none=True)
        step_loss.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
        optimizer.step()

        # 7. Log and checkpoint.
        satisfied = np.isfinite(log_potential.numpy()) & (log_potential.numpy() == 0.0)
        divergence_on_batch = policy_divergence(
            divergence, (log_policy.detach() - log_target).numpy(), _fixed_log_partition(log_z)
        )
        metrics = {
            "step": step,
            **step_loss.log_record(),
            "train/log_partition": log_z,
            "train/constraint_satisfaction": float(satisfied.mean()),
            "train/kl_to_base": float((log_policy.detach() - log_base).mean()),
            f"train/{divergence.name}_on_batch": divergence_on_batch.value,
            "train/mean_length": float(batch.lengths.double().mean()),
            "train/grad_norm": float(grad_norm),
            "train/learning_rate": optimizer.param_groups[0]["lr"],
            "time/step_seconds": time.perf_counter() - step_started,
            "estimators": {**LOGGED_ESTIMATORS, f"train/{divergence.name}_on_batch": divergence_on_batch.method},
        }
        with log_path.open("a") as stream:
            stream.write(json.dumps(_finite_or_string(metrics)) + "\n")
        if step % config.checkpoint_every == 0 and step != config.steps:
            _write_checkpoint(output_dir / f"step-{step:06d}", policy, tokenizer, optimizer, trainer_state(step))
        if on_step is not None:
            on_step(step, config.steps, metrics)

    final = output_dir / FINAL_DIR
    if start_step < config.steps or not (final / STATE_FILE).is_file():
        # final/ is resumable too: rerunning with more steps continues from it.
        _write_checkpoint(final, policy, tokenizer, optimizer, trainer_state(max(start_step, config.steps)))
    return TrainResult(final, config.steps - start_step, start_step, time.perf_counter() - started, metrics)


def _fixed_log_partition(log_z: float) -> Estimate:
    """Wrap the running log Ẑ as an estimate without error, for on-batch metrics."""
    return Estimate(log_z, 0.0, log_z, log_z, 1, "running")


def _finite_or_string(record: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}

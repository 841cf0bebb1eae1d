"""The f-DPG training loop, shared by every method.

RLHF (reverse KL), GDC (forward KL), Jensen–Shannon, total variation and the
rest of the f-divergence family differ only in the pseudo-reward −f′(π/p);
everything else is this one loop. Natural logs, nats.

Output folder layout (``output_dir``)::

    .lock                    held (flock) by the process that trains in this folder
    train_log.jsonl          one JSON record per step, namespaced keys
    step-000040/             resumable checkpoint: HF model + tokenizer,
                             trainer_state.json, optimizer_and_rng.pt
    final/                   the finished policy, same files

Each checkpoint is written to a temporary folder and renamed into place, so
an interrupted write never leaves a half-written checkpoint. A new run in the
same folder resumes from the latest complete checkpoint.

Under ``torchrun --nproc-per-node N`` each rank samples its share of every
prompt's samples from its own random stream, and the policy is wrapped in
DistributedDataParallel. The per-sample statistics (log π_θ, log P, texts)
are gathered, so every rank updates the same running log Ẑ_c and computes the
same pseudo-rewards and baselines as one process would on the union of the
samples. Each rank's loss is scaled so that DDP's gradient average equals the
gradient of the single-process loss on that union. Only rank 0 writes the log
and the checkpoints; a checkpoint stores every rank's random state.
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

from fdiv_eval.distributed import (
    Runtime,
    all_gather_objects,
    barrier,
    broadcast_object,
    current,
    map_sharded,
    rank_seed,
    sample_sharded,
    share,
    share_bounds,
)
from fdiv_eval.divergences import get_divergence
from fdiv_eval.errors import InvalidInputError
from fdiv_eval.estimators import (
    log_partition,
    policy_divergence,
    require_accepted_samples,
    require_finite_log_partition,
)
from fdiv_eval.estimates import Estimate, log_sum_exp
from fdiv_eval.prompts import Context, build_contexts, per_prompt_count, with_prompt
from fdiv_eval.sequences import (
    SampleBatch,
    load_model,
    load_tokenizer,
    sample,
    score,
    sequence_log_probs_with_grad,
)
from fdiv_eval.target_metrics import policy_target_metrics
from fdiv_eval.targets import PointwiseTarget
from trainers.losses import LOGGED_ESTIMATORS, fdpg_loss, sharded_surrogate_loss, update_log_partition

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
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
    keep_checkpoints: int = 0
    """Keep only the newest this many ``step-*`` checkpoints; 0 keeps all."""
    log_partition_samples: int = 2048
    """Base-model samples that start the running log Z estimate."""
    seed: int = 0
    suite_hash: str = ""
    """Hash of the suite that asked for this run; stored in every checkpoint."""
    prompts_per_step: int = 8
    """With prompts: prompts drawn per step, each with batch_size // prompts_per_step samples."""
    chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template as a user message."""
    trust_remote_code: bool = False
    """Let the base model and checkpoints run their own Python model code."""


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
    if config.prompts_per_step < 1:
        raise InvalidInputError(f"prompts_per_step must be at least 1, got {config.prompts_per_step}")
    if config.batch_size < 2 and config.baseline == "leave_one_out":
        raise InvalidInputError("the leave_one_out baseline needs batch_size of at least 2")


def _remove_partial_checkpoints(output_dir: Path) -> None:
    """Delete staging folders that a crash left behind mid-write, with a warning naming each."""
    for partial in sorted(output_dir.glob(".step-*")) + sorted(output_dir.glob(f".{FINAL_DIR}-*")):
        logger.warning("skipping and removing partial checkpoint %s left by an interrupted write", partial.name)
        shutil.rmtree(partial, ignore_errors=True)
    for folder in [*output_dir.glob("step-*"), output_dir / FINAL_DIR]:
        if folder.is_dir() and not (folder / STATE_FILE).is_file():
            logger.warning("skipping checkpoint %s: it has no %s", folder.name, STATE_FILE)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """Return the complete checkpoint (``step-*`` or ``final``) with the highest step, or None."""
    candidates = [p for p in [*output_dir.glob("step-*"), output_dir / FINAL_DIR] if (p / STATE_FILE).is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: json.loads((p / STATE_FILE).read_text())["step"])


def _random_states(device: torch.device) -> dict:
    """This process's random states: torch's CPU generator, and the accelerator's when there is one."""
    states = {"torch_rng": torch.random.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def _restore_random_states(states: dict, device: torch.device) -> None:
    torch.random.set_rng_state(states["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in states:
        torch.cuda.set_rng_state(states["cuda_rng"], device)


def _write_checkpoint(folder: Path, policy, tokenizer, optimizer, state: dict, random_states: list[dict]) -> None:
    """Save model, tokenizer, trainer state and every rank's random states into ``folder`` atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    staging.chmod(0o755)
    policy.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    torch.save(
        {"optimizer": optimizer.state_dict(), **random_states[0], "random_states_per_rank": random_states},
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


def _initial_log_partition(base, tokenizer, target, contexts: list[Context], config: FDPGConfig
                           ) -> tuple[list[float], list[int]]:
    """Start the running log Z_c of every prompt from an independent base-model sample.

    Under torchrun the ranks share the sample, and every rank gets the same sums.
    """
    count = per_prompt_count(config.log_partition_samples, len(contexts))
    hint = "raise train.log_partition_samples, or choose a target constraint that the base model satisfies more often"
    log_sums, counts, satisfied = [], [], []
    for context in contexts:
        batch = sample_sharded(
            base, context.prompt_ids, count, config.max_new_tokens,
            tokenizer.eos_token_id, tokenizer.pad_token_id, seed=config.seed + 1 + context.index,
        )
        texts = tokenizer.batch_decode(batch.sequences.tolist(), skip_special_tokens=True)
        log_potentials = map_sharded(with_prompt(target.log_potential, context.text), texts)
        satisfied.append(map_sharded(with_prompt(target.constraint, context.text), texts).astype(bool))
        require_finite_log_partition(log_partition(log_potentials), hint)
        log_sums.append(log_sum_exp(log_potentials))
        counts.append(log_potentials.size)
    if getattr(target, "has_constraint", True):
        require_accepted_samples(np.concatenate(satisfied), target.constraint_description, hint)
    return log_sums, counts


def _contexts_for_step(contexts: list[Context], config: FDPGConfig, step: int) -> list[Context]:
    """Return the prompts of one step: all of them when there is one, else a seeded draw without replacement."""
    if len(contexts) == 1:
        return contexts
    size = min(config.prompts_per_step, len(contexts))
    # Seeded by step, so a resumed run draws the same prompts as an uninterrupted one.
    chosen = np.random.default_rng([config.seed, step]).choice(len(contexts), size=size, replace=False)
    return [contexts[int(index)] for index in chosen]


def train_policy(
    base_model: str,
    target: PointwiseTarget,
    config: FDPGConfig,
    output_dir: str | Path,
    on_step: StepCallback | None = None,
    prompts: list[str] | None = None,
    runtime: Runtime | None = None,
) -> TrainResult:
    """Fine-tune a copy of ``base_model`` toward ``target`` by f-DPG; resume if possible.

    Each step: sample a batch from the policy; score log π_θ (with grad) and
    log π0; fold the batch's log-weights into the running log Ẑ; compute the
    pseudo-reward −f′(t) from log t = log π_θ − log P + log Ẑ; subtract the
    baseline; take one clipped optimizer step on the surrogate loss.

    With ``prompts``, each step draws ``prompts_per_step`` of them; every
    prompt c keeps its own running log Ẑ_c, and the baseline is taken within
    the samples of each prompt. ``runtime`` (default: ``distributed.current()``)
    gives this process's rank and the device of the models.
    """
    runtime = runtime or current()
    _validate(config, target)
    divergence = get_divergence(config.method, config.alpha)
    output_dir = Path(output_dir)
    started = time.perf_counter()

    tokenizer = load_tokenizer(base_model, config.trust_remote_code)
    base = load_model(base_model, device=runtime.device, trust_remote_code=config.trust_remote_code)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    contexts = build_contexts(tokenizer, prompts, config.chat_template)
    _check_shares(config, len(contexts), runtime.world_size)

    # Rank 0 locks the folder, so that a second run cannot write into it at the same time.
    lock = _RunFolderLock(output_dir) if runtime.is_main else None
    busy = broadcast_object(lock.acquire() if lock else None, runtime)
    if busy:
        raise InvalidInputError(busy)
    try:
        return _train_locked(base_model, target, config, output_dir, on_step, prompts, runtime, tokenizer, base,
                             contexts, divergence, started)
    except BaseException:
        if lock is not None:
            lock.remove_created_folders()
        raise
    finally:
        if lock is not None:
            lock.release()


def _train_locked(base_model, target, config: FDPGConfig, output_dir: Path, on_step, prompts, runtime: Runtime,
                  tokenizer, base, contexts: list[Context], divergence, started: float) -> TrainResult:
    """Run the steps of ``train_policy`` once this run holds the folder's lock."""
    log_path = output_dir / LOG_FILE
    # Rank 0 removes torn checkpoints, and the other ranks look for checkpoints once it is done.
    if runtime.is_main:
        _remove_partial_checkpoints(output_dir)
    barrier(runtime)
    resume_from = latest_checkpoint(output_dir)
    if resume_from is not None:
        state = json.loads((resume_from / STATE_FILE).read_text())
        if state.get("method") != config.method or state.get("suite_hash") != config.suite_hash:
            raise InvalidInputError(
                f"{output_dir} contains checkpoints of another run (method {state.get('method')!r}, "
                f"suite hash {state.get('suite_hash')!r}); delete the folder or choose another output folder"
            )
        policy = load_model(str(resume_from), device=runtime.device, trust_remote_code=config.trust_remote_code)
        optimizer = _make_optimizer(config, policy.parameters())
        # weights_only: the file contains tensors and plain containers, so nothing is unpickled as code.
        tensors = torch.load(resume_from / TENSOR_STATE_FILE, weights_only=True, map_location="cpu")
        optimizer.load_state_dict(tensors["optimizer"])
        start_step = int(state["step"])
        _resume_random_states(tensors, config, start_step, runtime, resume_from, warn=start_step < config.steps)
        log_z_sums = [float(v) for v in state.get("log_partition_log_sums", [state["log_partition_log_sum"]])]
        log_z_counts = [int(v) for v in state.get("log_partition_counts", [state["log_partition_count"]])]
        if len(log_z_sums) != len(contexts):
            raise InvalidInputError(
                f"{output_dir} contains a run with {len(log_z_sums)} prompts, not {len(contexts)}; "
                "delete the folder or choose another output folder"
            )
        if runtime.is_main:
            _truncate_log(log_path, start_step)
        logger.info("resuming %s from step %d (%s)", config.method, start_step, resume_from.name)
    else:
        torch.manual_seed(rank_seed(config.seed, runtime.rank, runtime.world_size))
        policy = load_model(base_model, device=runtime.device, trust_remote_code=config.trust_remote_code)
        optimizer = _make_optimizer(config, policy.parameters())
        start_step = 0
        log_z_sums, log_z_counts = _initial_log_partition(base, tokenizer, target, contexts, config)
        if runtime.is_main and log_path.exists():
            log_path.unlink()

    # Dropout stays off while training, so the sampled distribution is the
    # one whose log-probs the loss differentiates.
    policy.eval()
    trained = _wrap_for_gradients(policy, runtime)
    metrics: dict = {}

    def trainer_state(step: int) -> dict:
        return {
            "step": step,
            "method": config.method,
            "divergence": divergence.name,
            "alpha": config.alpha,
            "log_partition": log_z_sums[0] - math.log(log_z_counts[0]),
            "log_partition_log_sum": log_z_sums[0],
            "log_partition_count": log_z_counts[0],
            "log_partition_log_sums": log_z_sums,
            "log_partition_counts": log_z_counts,
            "suite_hash": config.suite_hash,
            "base_model": base_model,
            "target": target.describe(),
            "config": asdict(config),
            "world_size": runtime.world_size,
        }

    def save(folder: Path, step: int) -> None:
        # Every rank hands over its random state; rank 0 writes the checkpoint.
        random_states = all_gather_objects(_random_states(runtime.device), runtime)
        if runtime.is_main:
            _write_checkpoint(folder, policy, tokenizer, optimizer, trainer_state(step), random_states)
        barrier(runtime)

    for step in range(start_step + 1, config.steps + 1):
        step_started = time.perf_counter()

        # 1-2. Per prompt of this step: sample this rank's share from the current
        # policy, then score log π_θ with grad, log π0 without, and the target potential.
        chosen = _contexts_for_step(contexts, config, step)
        per_context = config.batch_size // len(chosen)
        local_count = share(per_context, runtime.rank, runtime.world_size)
        batches = [sample(policy, context.prompt_ids, local_count, config.max_new_tokens, tokenizer.eos_token_id,
                          tokenizer.pad_token_id, batch_size=local_count) for context in chosen]
        local = score_step_samples(trained, base, tokenizer, target, chosen, batches)
        batch = gather_step_samples(local, chosen, per_context, runtime)

        # 3-6. Running log Z_c, pseudo-rewards, baselines and the surrogate loss's gradient.
        optimizer.zero_grad(set_to_none=True)
        outcome = backward_step(divergence, config.baseline, local, batch, chosen, log_z_sums, log_z_counts, runtime)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
        optimizer.step()

        # 7. Log and checkpoint (rank 0 writes).
        if runtime.is_main:
            metrics = _step_metrics(step, outcome, divergence, target, batch, grad_norm, optimizer,
                                    time.perf_counter() - step_started)
            with log_path.open("a") as stream:
                stream.write(json.dumps(_finite_or_string(metrics)) + "\n")
        if step % config.checkpoint_every == 0 and step != config.steps:
            save(output_dir / f"step-{step:06d}", step)
            if runtime.is_main:
                _prune_checkpoints(output_dir, config.keep_checkpoints)
        if on_step is not None and runtime.is_main:
            on_step(step, config.steps, metrics)

    final = output_dir / FINAL_DIR
    if start_step < config.steps or not (final / STATE_FILE).is_file():
        # final/ is resumable too: rerunning with more steps continues from it.
        save(final, max(start_step, config.steps))
    return TrainResult(final, max(0, config.steps - start_step), start_step, time.perf_counter() - started, metrics)


class _RunFolderLock:
    """An exclusive flock on ``<output_dir>/.lock``, held while one run trains there.

    The kernel releases a flock when its process dies, even by SIGKILL, so a
    crashed run never leaves a stale lock. Folders that ``acquire`` created
    are removed again when training fails, so invalid input leaves no empty
    run folder behind.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.created: Path | None = None
        self.stream = None

    def acquire(self) -> str | None:
        """Create the folder if needed and take the lock; return an error message when another run holds it."""
        missing = [folder for folder in (self.output_dir, *self.output_dir.parents) if not folder.exists()]
        self.created = missing[-1] if missing else None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.stream = (self.output_dir / LOCK_FILE).open("a+")
        try:
            import fcntl
        except ImportError:
            # NOTE: without fcntl (Windows) two runs in one folder are not detected.
            return None
        try:
            fcntl.flock(self.stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.stream.seek(0)
            holder = self.stream.read().strip() or "unknown"
            self.stream.close()
            self.stream = None
            return (f"another run is training in {self.output_dir} (process {holder}); wait for it to finish or stop "
                    "it, then rerun this command to resume")
        self.stream.seek(0)
        self.stream.truncate()
        self.stream.write(str(os.getpid()))
        self.stream.flush()
        return None

    def release(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def remove_created_folders(self) -> None:
        """Delete the folders that ``acquire`` created, if nothing but the lock file was written there."""
        if self.created is None or not self.output_dir.is_dir():
            return
        if any(path.name != LOCK_FILE for path in self.output_dir.iterdir()):
            return
        self.release()
        shutil.rmtree(self.created, ignore_errors=True)


def _prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete ``step-*`` checkpoints (nothing when ``keep`` is 0).

    Called only after a new checkpoint is complete, so a crash during the
    deletion still leaves that newest checkpoint to resume from.
    """
    if keep < 1:
        return
    complete = sorted(path for path in output_dir.glob("step-*") if (path / STATE_FILE).is_file())
    for folder in complete[:-keep]:
        logger.info("removing checkpoint %s (train.keep_checkpoints is %d)", folder.name, keep)
        shutil.rmtree(folder)


def _check_shares(config: FDPGConfig, prompt_count: int, world_size: int) -> None:
    """Raise when a step has fewer samples per prompt than there are processes to share them."""
    prompts_per_step = 1 if prompt_count == 1 else min(config.prompts_per_step, prompt_count)
    per_prompt = config.batch_size // prompts_per_step
    if per_prompt < world_size:
        drawn = (f"each step draws {per_prompt} samples" if prompt_count == 1 else
                 f"each step draws {per_prompt} samples per prompt (batch_size {config.batch_size} over "
                 f"{prompts_per_step} prompts)")
        raise InvalidInputError(
            f"{drawn}, fewer than the {world_size} processes that share them; raise train.batch_size to at least "
            f"{world_size * prompts_per_step} or launch fewer processes"
        )


def _wrap_for_gradients(policy, runtime: Runtime):
    """Return the module whose forward pass the loss differentiates: the policy, or its DDP wrapper.

    Sampling and saving use the plain policy; only the scoring pass that
    carries gradients goes through DistributedDataParallel, which averages the
    gradients over ranks during backward.
    """
    if not runtime.is_distributed:
        return policy
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # Every rank loads the same checkpoint and no buffer changes during training,
    # so the per-forward broadcast of buffers from rank 0 is skipped.
    import inspect

    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers.
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {
        "broadcast_buffers": False}
    return DistributedDataParallel(policy, device_ids=device_ids, **no_buffer_sync)


def _resume_random_states(tensors: dict, config: FDPGConfig, start_step: int, runtime: Runtime,
                          checkpoint: Path, warn: bool = True) -> None:
    """Restore this rank's random states, or reseed when the checkpoint came from another process count."""
    per_rank = tensors.get("random_states_per_rank") or [{"torch_rng": tensors["torch_rng"]}]
    if len(per_rank) == runtime.world_size:
        _restore_random_states(per_rank[runtime.rank], runtime.device)
        return
    # NOTE: the sample streams of N processes cannot be split into those of M,
    # so the resumed run continues from the same weights and optimizer state
    # with fresh, seeded streams. It no longer matches an uninterrupted run bitwise.
    if runtime.is_main and warn:
        logger.warning(
            "checkpoint %s was written by %d processes and this run has %d: each rank gets a fresh random stream "
            "seeded from (seed, step, rank), so the samples differ from an uninterrupted run",
            checkpoint.name, len(per_rank), runtime.world_size,
        )
    torch.manual_seed(rank_seed(config.seed + start_step, runtime.rank, runtime.world_size))


@dataclass
class _LocalStep:
    """This rank's share of one step: per-sample tensors [b] (log_policy keeps its graph)."""

    log_policy: torch.Tensor
    log_base: torch.Tensor
    log_potential: torch.Tensor
    texts: list[str]
    lengths: torch.Tensor
    counts: list[int]
    """Samples per chosen prompt, in order."""


@dataclass
class _StepBatch:
    """The samples of all ranks in one step, detached, on the CPU, ordered by prompt, then rank.

    That order makes the pseudo-rewards and baselines the same as one process
    computes on the union; ``local_rows`` picks this rank's rows out of it.
    """

    log_policy: torch.Tensor
    log_base: torch.Tensor
    log_potential: torch.Tensor
    texts: list[str]
    lengths: torch.Tensor
    groups: list[int]
    local_rows: torch.Tensor


def score_step_samples(trained, base, tokenizer, target, chosen: list[Context], batches: list[SampleBatch]
                       ) -> _LocalStep:
    """Score this rank's samples of one step: log π_θ with its graph, log π0 and log potential, per prompt."""
    log_policy_parts, log_base_parts, log_potential_parts, texts, lengths, counts = [], [], [], [], [], []
    for context, batch in zip(chosen, batches):
        log_policy_parts.append(sequence_log_probs_with_grad(trained, batch))
        with torch.no_grad():
            log_base_parts.append(score(base, batch, batch_size=len(batch)).log_prob)
        context_texts = tokenizer.batch_decode(batch.sequences.tolist(), skip_special_tokens=True)
        context_prompts = None if context.text is None else [context.text] * len(context_texts)
        log_potential_parts.append(torch.from_numpy(target.log_potential(context_texts, context_prompts)))
        texts += context_texts
        lengths.append(batch.lengths)
        counts.append(len(context_texts))
    return _LocalStep(torch.cat(log_policy_parts), torch.cat(log_base_parts), torch.cat(log_potential_parts),
                      texts, torch.cat(lengths), counts)


def gather_step_samples(local: _LocalStep, chosen: list[Context], per_context: int, runtime: Runtime) -> _StepBatch:
    """Gather every rank's share of the step, in prompt-then-rank order."""
    detached = local.log_policy.detach().cpu()
    if not runtime.is_distributed:
        return _StepBatch(detached, local.log_base, local.log_potential, local.texts, local.lengths, local.counts,
                          torch.arange(len(local.texts)))
    shares = all_gather_objects(
        (detached, local.log_base, local.log_potential, local.texts, local.lengths, local.counts), runtime
    )
    columns: dict[str, list] = {"log_policy": [], "log_base": [], "log_potential": [], "lengths": []}
    texts: list[str] = []
    for index in range(len(chosen)):
        for log_policy, log_base, log_potential, rank_texts, lengths, counts in shares:
            start = sum(counts[:index])
            stop = start + counts[index]
            columns["log_policy"].append(log_policy[start:stop])
            columns["log_base"].append(log_base[start:stop])
            columns["log_potential"].append(log_potential[start:stop])
            columns["lengths"].append(lengths[start:stop])
            texts += rank_texts[start:stop]
    first, last = share_bounds(per_context, runtime.rank, runtime.world_size)
    local_rows = torch.cat([torch.arange(index * per_context + first, index * per_context + last)
                            for index in range(len(chosen))])
    return _StepBatch(torch.cat(columns["log_policy"]), torch.cat(columns["log_base"]),
                      torch.cat(columns["log_potential"]), texts, torch.cat(columns["lengths"]),
                      [per_context] * len(chosen), local_rows)


@dataclass
class StepOutcome:
    """The tensors one step's backward pass was built from, kept for the training log."""

    step_loss: object
    """The FDPGLoss over the samples of every rank (its loss is the value of the optimized loss)."""
    log_target: torch.Tensor
    log_z_per_sample: torch.Tensor
    log_z: float


def backward_step(divergence, baseline: str, local: _LocalStep, batch: _StepBatch, chosen: list[Context],
                  log_z_sums: list[float], log_z_counts: list[int], runtime: Runtime) -> StepOutcome:
    """Update the running log Ẑ_c, build the f-DPG loss and backpropagate it into the policy's gradients.

    ``log_z_sums`` and ``log_z_counts`` are updated in place. In one process
    the loss is ``fdpg_loss`` on the local tensors. Across N ranks, the
    pseudo-rewards and baselines come from the gathered ``batch`` (the same on
    every rank) and each rank backpropagates its rows' share of the loss.
    """
    log_target = batch.log_base + batch.log_potential

    # 3. Running log Z_c of each prompt from the on-policy importance weights P/π_θ,
    # over the samples of every rank.
    log_z_rows = []
    for context, rows in zip(chosen, torch.split(log_target - batch.log_policy, batch.groups)):
        index = context.index
        log_z_sums[index], log_z_counts[index] = update_log_partition(log_z_sums[index], log_z_counts[index], rows)
        log_z_rows.append(torch.full((rows.numel(),), log_z_sums[index] - math.log(log_z_counts[index]),
                                     dtype=torch.float64))
    log_z_per_sample = torch.cat(log_z_rows)

    # 4-6. Pseudo-reward −f′(π_θ/p) with each prompt's log Ẑ_c, a baseline within
    # each prompt's samples, and the surrogate loss.
    device = local.log_policy.device
    if runtime.is_distributed:
        step_loss = fdpg_loss(divergence, batch.log_policy, log_target, log_z_per_sample, baseline, batch.groups)
        advantages = step_loss.advantages[batch.local_rows].to(device)
        loss = sharded_surrogate_loss(advantages, local.log_policy, len(batch.texts), runtime.world_size)
    else:
        step_loss = fdpg_loss(divergence, local.log_policy, log_target.to(device), log_z_per_sample.to(device),
                              baseline, batch.groups)
        loss = step_loss.loss
    loss.backward()
    return StepOutcome(step_loss, log_target, log_z_per_sample, float(log_z_per_sample.mean()))


def _step_metrics(step: int, outcome: StepOutcome, divergence, target, batch: _StepBatch, grad_norm, optimizer,
                  seconds: float) -> dict:
    """Build the training log record of one step from the samples of every rank."""
    satisfied = target.constraint(batch.texts)
    divergence_on_batch = policy_divergence(
        divergence, (batch.log_policy - outcome.log_target + outcome.log_z_per_sample).numpy(),
        _fixed_log_partition(0.0),
    )
    return {
        "step": step,
        **outcome.step_loss.log_record(),
        "train/log_partition": outcome.log_z,
        "train/constraint_satisfaction": float(satisfied.mean()),
        "train/kl_to_base": float((batch.log_policy - batch.log_base).mean()),
        f"train/{divergence.name}_on_batch": divergence_on_batch.value,
        "train/mean_length": float(batch.lengths.double().mean()),
        "train/grad_norm": float(grad_norm),
        "train/learning_rate": optimizer.param_groups[0]["lr"],
        "time/step_seconds": seconds,
        **target_batch_metrics(target, batch.texts, None, batch.log_policy.numpy(), batch.log_base.numpy()),
        "estimators": {**LOGGED_ESTIMATORS, f"train/{divergence.name}_on_batch": divergence_on_batch.method},
    }


def target_batch_metrics(target, texts, prompts, log_policy, log_base) -> dict:
    """Batch means of the target's moments or reward, as ``train/…`` log entries."""
    estimates = policy_target_metrics(target, texts, prompts, log_policy, log_base)
    return {f"train/{name}": estimate.value for name, estimate in estimates.items()}


def _fixed_log_partition(log_z: float) -> Estimate:
    """Wrap the running log Ẑ as an estimate without error, for on-batch metrics."""
    return Estimate(log_z, 0.0, log_z, log_z, 1, "running")


def _finite_or_string(record: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}

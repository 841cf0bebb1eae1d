"""Running under ``torchrun``: ranks, devices, sample shares and gathers.

``torchrun --nproc-per-node N`` (and ``accelerate launch``, which drives it)
starts N copies of the same command with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in the environment. ``setup`` reads them, joins the process
group (gloo on the CPU, NCCL on CUDA) and picks the device. Without those
variables everything runs as one process and no process group is created.

The rules that keep a multi-process result equal to a single-process one:

- a draw of n samples is split into contiguous shares, and rank r takes
  ``share(n, r, N)`` of them. Each rank samples its share from its own seeded
  stream (``rank_seed``), so a fixed N and seed always give the same samples.
- Per-sample statistics are gathered in rank order, so every rank ends up
  with the same arrays, in the same order, as one process that drew the union.
- Only rank 0 writes files and prints.

With N = 1 every helper here calls the single-process function with the same
arguments, so results do not change when torch.distributed is not in use.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fdiv_eval.errors import InvalidInputError
from fdiv_eval.sequences import SampleBatch, SequenceScores, sample, score, score_pair

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """The rank of this process among ``world_size`` processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and prints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


_current = Runtime()


def current() -> Runtime:
    """Return the runtime set by ``setup`` (one CPU process when ``setup`` was not called)."""
    return _current


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """Turn ``--device`` into a torch device: ``auto`` (or None), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

    ``auto`` takes CUDA when it is available, else the CPU. Under torchrun,
    plain ``cuda`` means the GPU of this process's local rank.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidInputError(
            f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"device {name!r} was requested, but CUDA is not available here; use --device cpu")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise InvalidInputError(
                f"device cuda:{index} does not exist: this machine has {torch.cuda.device_count()} CUDA devices; "
                "launch at most that many processes per node or name an existing device"
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError(f"device {name!r} was requested, but MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise InvalidInputError(f"unsupported device {name!r}; choose auto, cpu, cuda, cuda:N or mps")
    return device


def _environment_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise InvalidInputError(f"environment variable {name}={text!r} is not an integer; launch with torchrun") from None


def setup(device: str | None = None) -> Runtime:
    """Read the torchrun environment, join the process group if there is one, and choose the device.

    Calling it again rereads the environment and keeps the process group already joined.
    """
    global _current
    world_size = _environment_int("WORLD_SIZE", 1)
    rank = _environment_int("RANK", 0)
    local_rank = _environment_int("LOCAL_RANK", 0)
    resolved = resolve_device(device, local_rank)
    if world_size > 1:
        import torch.distributed as dist

        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        if not dist.is_initialized():
            backend = "nccl" if resolved.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            logger.info("rank %d of %d joined the %s process group on %s", rank, world_size, backend, resolved)
        _watch_launcher()
    _current = Runtime(rank, world_size, local_rank, resolved)
    return _current


LAUNCHER_POLL_SECONDS = 1.0
"""How often a worker checks that the torchrun process that started it is still alive."""
_watching = False


def _watch_launcher() -> None:
    """Stop this worker soon after the torchrun launcher dies.

    torchrun starts each worker in a session of its own, so a SIGKILL to the
    launcher's process group (or an out-of-memory kill of the launcher) would
    leave the workers running and writing to the run folder. Once the
    launcher is gone the worker is re-parented, its parent process id
    changes, and a daemon thread ends the process. A checkpoint write cut
    short this way leaves only a staging folder, which the next run removes.
    """
    global _watching
    if _watching or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    _watching = True
    launcher = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(LAUNCHER_POLL_SECONDS)
            if os.getppid() != launcher:
                logger.error("the torchrun launcher (process %d) has exited; stopping this worker", launcher)
                logging.shutdown()
                os._exit(1)

    threading.Thread(target=watch, name="fdiv-launcher-watch", daemon=True).start()


def teardown() -> None:
    """Leave the process group, if this process joined one, and forget the runtime."""
    global _current
    if _current.is_distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _current = Runtime()


def share(total: int, rank: int, world_size: int) -> int:
    """Return rank's part of ``total`` items: equal parts, the first ``total % world_size`` ranks one more."""
    return total // world_size + (1 if rank < total % world_size else 0)


def share_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return [start, stop) of rank's contiguous share of ``total`` items."""
    start = sum(share(total, r, world_size) for r in range(rank))
    return start, start + share(total, rank, world_size)


def rank_seed(seed: int, rank: int, world_size: int) -> int:
    """Seed of rank's stream: ``seed`` itself in one process, else a distinct seed per (seed, rank)."""
    if world_size == 1:
        return seed
    return int(np.random.SeedSequence([seed, rank, world_size]).generate_state(1, dtype=np.uint32)[0])


def all_gather_objects(value: Any, runtime: Runtime | None = None) -> list[Any]:
    """Return every rank's ``value``, in rank order (``[value]`` in one process)."""
    runtime = runtime or current()
    if not runtime.is_distributed:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(runtime: Runtime | None = None) -> None:
    """Wait until every rank gets here (nothing in one process)."""
    runtime = runtime or current()
    if runtime.is_distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(value: Any, runtime: Runtime | None = None) -> Any:
    """Return rank 0's ``value`` on every rank."""
    runtime = runtime or current()
    if not runtime.is_distributed:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _scaled(progress, world_size: int):
    # Rank 0 reports its own share; the others advance at the same pace.
    if progress is None:
        return None
    return lambda count: progress(count * world_size)


def sample_sharded(model, prompt_ids: torch.Tensor, n: int, max_new_tokens: int, eos_token_id, pad_token_id: int,
                   batch_size: int = 256, seed: int | None = None, progress=None,
                   runtime: Runtime | None = None) -> SampleBatch:
    """Draw n continuations across all ranks and return the whole batch on every rank.

    Rank r draws ``share(n, r, N)`` of them from the stream of
    ``rank_seed(seed, r, N)``; the shares are concatenated in rank order.
    """
    runtime = runtime or current()
    if not runtime.is_distributed:
        return sample(model, prompt_ids, n, max_new_tokens, eos_token_id, pad_token_id, batch_size, seed, progress)
    count = share(n, runtime.rank, runtime.world_size)
    stream = None if seed is None else rank_seed(seed, runtime.rank, runtime.world_size)
    local = None
    if count > 0:
        local = sample(model, prompt_ids, count, max_new_tokens, eos_token_id, pad_token_id, batch_size, stream,
                       _scaled(progress, runtime.world_size))
    parts = [part for part in all_gather_objects(local, runtime) if part is not None]
    return SampleBatch.concatenate(parts, pad_token_id)


def _gather_rows(local: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    return torch.cat(all_gather_objects(local, runtime))


def map_sharded(function, items: list, runtime: Runtime | None = None) -> np.ndarray:
    """Apply a per-item ``function`` (list → array of len(list)) to each rank's share; return every row.

    Used for scorers and constraints, whose value for one text does not
    depend on the other texts, so the gathered result equals ``function(items)``.
    """
    runtime = runtime or current()
    if not runtime.is_distributed:
        return np.asarray(function(items))
    start, stop = share_bounds(len(items), runtime.rank, runtime.world_size)
    local = np.asarray(function(items[start:stop])) if stop > start else None
    parts = [part for part in all_gather_objects(local, runtime) if part is not None]
    return np.concatenate(parts)


def _empty_scores() -> SequenceScores:
    return SequenceScores(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))


def score_sharded(model, batch: SampleBatch, batch_size: int = 256, progress=None,
                  runtime: Runtime | None = None) -> SequenceScores:
    """Score a batch that every rank holds: each rank scores its share, and all ranks get every row."""
    runtime = runtime or current()
    if not runtime.is_distributed:
        return score(model, batch, batch_size, progress)
    start, stop = share_bounds(len(batch), runtime.rank, runtime.world_size)
    local = _empty_scores()
    if stop > start:
        local = score(model, batch.slice(start, stop), batch_size, _scaled(progress, runtime.world_size))
    return SequenceScores(_gather_rows(local.log_prob, runtime), _gather_rows(local.token_entropy_sum, runtime))


def score_pair_sharded(policy, base, batch: SampleBatch, batch_size: int = 256, progress=None,
                       runtime: Runtime | None = None) -> tuple[SequenceScores, SequenceScores, torch.Tensor]:
    """``score_pair`` with the rows split across ranks and gathered on every rank."""
    runtime = runtime or current()
    if not runtime.is_distributed:
        return score_pair(policy, base, batch, batch_size, progress)
    start, stop = share_bounds(len(batch), runtime.rank, runtime.world_size)
    policy_scores, base_scores, token_kl = _empty_scores(), _empty_scores(), torch.zeros(0, dtype=torch.float64)
    if stop > start:
        policy_scores, base_scores, token_kl = score_pair(policy, base, batch.slice(start, stop), batch_size,
                                                          _scaled(progress, runtime.world_size))
    return (
        SequenceScores(_gather_rows(policy_scores.log_prob, runtime),
                       _gather_rows(policy_scores.token_entropy_sum, runtime)),
        SequenceScores(_gather_rows(base_scores.log_prob, runtime), _gather_rows(base_scores.token_entropy_sum, runtime)),
        _gather_rows(token_kl, runtime),
    )

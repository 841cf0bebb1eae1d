"""Loading causal LMs, pure ancestral sampling and teacher-forced scoring.

A generated sequence x is the continuation of a prompt (by default the single
BOS token): its tokens up to and including the first EOS, or
``max_new_tokens`` tokens when no EOS comes. ``SampleBatch`` stores the
continuations right-padded with ``pad_token_id`` together with their lengths,
and every mask is built from those lengths, never from token values, because
the pad token often equals EOS.

Rules that keep the sampled distribution equal to the scored one:

- models sample and score in eval mode, so dropout is off;
- sampling is ancestral at temperature 1, with no top-k, top-p or repetition
  penalty, whatever the checkpoint's own ``generation_config`` sets;
- log-probs come from one teacher-forced forward pass, with log-softmax in
  float32 (or the model's dtype if wider) and sums over tokens in float64.

Shapes: B = batch size, P = prompt length, T = longest continuation, V = vocabulary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from fdiv_eval.errors import InvalidInputError

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int], None]
"""Called with the number of sequences just finished."""


@dataclass
class SampleBatch:
    """Continuations of one prompt, right-padded, with their lengths."""

    prompt_ids: torch.Tensor  # [P]
    sequences: torch.Tensor  # [B, T], padded with pad_token_id after each length
    lengths: torch.Tensor  # [B], number of tokens including the first EOS

    def __len__(self) -> int:
        return int(self.sequences.shape[0])

    def slice(self, start: int, stop: int) -> "SampleBatch":
        lengths = self.lengths[start:stop]
        width = int(lengths.max()) if lengths.numel() else 0
        return SampleBatch(self.prompt_ids, self.sequences[start:stop, :width], lengths)

    def batches(self, batch_size: int) -> Iterator["SampleBatch"]:
        for start in range(0, len(self), batch_size):
            yield self.slice(start, start + batch_size)

    @staticmethod
    def concatenate(parts: list["SampleBatch"], pad_token_id: int) -> "SampleBatch":
        width = max(part.sequences.shape[1] for part in parts)
        padded = [
            torch.nn.functional.pad(part.sequences, (0, width - part.sequences.shape[1]), value=pad_token_id)
            for part in parts
        ]
        return SampleBatch(parts[0].prompt_ids, torch.cat(padded), torch.cat([p.lengths for p in parts]))


def resolve_model_path(name_or_path: str) -> str:
    """Map ``embedded:austen`` to the shipped checkpoint; check that a local path exists."""
    from fdiv_eval.base_model import EMBEDDED_MODEL_NAME, embedded_model_path

    if name_or_path == EMBEDDED_MODEL_NAME:
        return str(embedded_model_path())
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or path.exists() or name_or_path.count("/") != 1
    if looks_local and not (path / "config.json").is_file():
        raise InvalidInputError(
            f"model {name_or_path!r} not found: expected a folder with config.json "
            f"(a Hugging Face checkpoint), a hub id where a hub is reachable, or {EMBEDDED_MODEL_NAME!r}"
        )
    return str(path) if looks_local else name_or_path


def require_safetensors(folder: Path, label: str) -> None:
    """Raise InvalidInputError when a local checkpoint folder has no ``.safetensors`` weights.

    ``label`` names the folder in the message, for example ``model 'gdc'``.
    Weights in ``pytorch_model.bin`` are pickles, which can run code when
    loaded, so only safetensors files are accepted.
    """
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        found = ", ".join(sorted(path.name for path in folder.iterdir() if path.suffix in (".bin", ".pt", ".pth")))
        raise InvalidInputError(
            f"{label} {str(folder)!r} has no .safetensors weights{f' (found {found})' if found else ''}; only "
            "safetensors are loaded, because pickled weights can run code: convert it with "
            "model.save_pretrained(folder, safe_serialization=True)"
        )


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
               trust_remote_code: bool = False):
    """Load a causal LM from safetensors in eval mode, with dropout off, on ``device`` (default: the CPU).

    ``trust_remote_code`` lets the checkpoint's own Python code define the
    model; only a suite that sets ``trust_remote_code: true`` turns it on.
    """
    from transformers import AutoModelForCausalLM

    resolved = resolve_model_path(name_or_path)
    require_safetensors(Path(resolved), "model")
    if trust_remote_code:
        logger.warning("loading %s with trust_remote_code: its own Python code runs in this process", name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except OSError as error:
        raise InvalidInputError(f"could not load model {name_or_path!r}: {error}") from error
    if device is not None:
        model.to(device)
    model.eval()
    return model


def model_device(model) -> torch.device:
    """Return the device of a model's first parameter (the CPU for a model without parameters)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    resolved = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"could not load the tokenizer of {name_or_path!r}: {error}") from error
    if tokenizer.eos_token_id is None:
        raise InvalidInputError(f"the tokenizer of {name_or_path!r} has no EOS token; set eos_token in its config")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_prompt(tokenizer) -> torch.Tensor:
    """Return the prompt of unconditional generation: the BOS token (EOS when there is no BOS)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return torch.tensor([token], dtype=torch.long)


def ancestral_generation_config(max_new_tokens: int, eos_token_id: int | Sequence[int], pad_token_id: int):
    """Build a generation config for pure ancestral sampling that overrides the checkpoint's settings."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=None,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=eos_token_id if isinstance(eos_token_id, int) else list(eos_token_id),
        pad_token_id=pad_token_id,
        use_cache=True,
    )


def lengths_from_eos(generated: torch.Tensor, eos_token_ids: int | Sequence[int]) -> torch.Tensor:
    """Return the length of each row [B] up to and including its first EOS.

    ``eos_token_ids`` is one id or several (a model may stop on any of them).
    A row without EOS, which reached ``max_new_tokens``, keeps its full width.
    Tokens after the first EOS (padding, which may equal EOS) never count.
    """
    ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    if not ids:
        raise InvalidInputError("eos_token_ids is empty; give at least one EOS token id")
    width = generated.shape[1]
    is_eos = torch.isin(generated, torch.tensor(ids, dtype=generated.dtype, device=generated.device))
    has_eos = is_eos.any(dim=1)
    first_eos = is_eos.int().argmax(dim=1)
    return torch.where(has_eos, first_eos + 1, torch.full_like(first_eos, width))


def length_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Return the boolean mask [B, width] that is true at the first ``lengths[b]`` positions of row b."""
    positions = torch.arange(width, device=lengths.device).unsqueeze(0)
    return positions < lengths.unsqueeze(1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum ``values`` over ``dim`` where ``mask`` is true, in float64.

    Masked positions are selected out, not multiplied by 0, so a NaN, ±inf or
    sentinel such as −1e9 at a padded position cannot reach the sum
    (NaN·0 and inf·0 are NaN). Gradients flow only through kept positions.
    """
    kept = torch.where(mask, values.double(), torch.zeros((), dtype=torch.float64, device=values.device))
    return kept.sum(dim=dim)


@torch.no_grad()
def sample(
    model,
    prompt_ids: torch.Tensor,
    n: int,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    batch_size: int = 256,
    seed: int | None = None,
    progress: ProgressCallback | None = None,
) -> SampleBatch:
    """Draw n continuations of ``prompt_ids`` by pure ancestral sampling.

    ``eos_token_id`` is one id or a list of ids that each end a sequence.
    When ``seed`` is given, the draws depend only on it (and the model);
    otherwise they continue torch's global random stream.
    """
    if n < 1:
        raise InvalidInputError(f"number of samples must be at least 1, got {n}")
    was_training = model.training
    model.eval()
    config = ancestral_generation_config(max_new_tokens, eos_token_id, pad_token_id)
    device = model_device(model)
    # A seeded draw runs on a forked random state, so the caller's stream
    # (CPU, and the accelerator's when the model sits on one) is left as it was.
    # On the CPU no accelerator state is forked, and fork_rng ignores device_type.
    accelerators = [] if device.type == "cpu" else [device]
    accelerator_type = "cuda" if device.type == "cpu" else device.type
    parts = []
    try:
        with torch.random.fork_rng(devices=accelerators, enabled=seed is not None, device_type=accelerator_type):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, n, batch_size):
                count = min(batch_size, n - start)
                inputs = prompt_ids.to(device).unsqueeze(0).expand(count, -1)
                output = model.generate(
                    input_ids=inputs,
                    attention_mask=torch.ones_like(inputs),
                    generation_config=config,
                )
                generated = output[:, prompt_ids.numel():].cpu()
                lengths = lengths_from_eos(generated, eos_token_id)
                generated = generated.masked_fill(~length_mask(lengths, generated.shape[1]), pad_token_id)
                parts.append(SampleBatch(prompt_ids, generated, lengths))
                if progress is not None:
                    progress(count)
    finally:
        model.train(was_training)
    return SampleBatch.concatenate(parts, pad_token_id)


def token_log_probs(model, batch: SampleBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the full next-token log-softmax at each continuation position, and the mask.

    One teacher-forced forward pass over prompt + continuation. Returns
    log-probs [B, T, V] (float32 or wider) and the length mask [B, T].
    Gradients flow when called outside ``torch.no_grad``. The results sit on
    the model's device; ``batch`` may sit anywhere.
    """
    device = model_device(model)
    count, width = batch.sequences.shape
    prompt_length = batch.prompt_ids.numel()
    prompt = batch.prompt_ids.to(device).unsqueeze(0).expand(count, -1)
    input_ids = torch.cat([prompt, batch.sequences.to(device)], dim=1)
    mask = length_mask(batch.lengths.to(device), width)
    attention_mask = torch.cat([torch.ones_like(prompt, dtype=torch.bool), mask], dim=1).long()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    # The logit at position i predicts token i + 1, so the continuation's
    # tokens are predicted by positions P − 1 .. P + T − 2.
    logits = logits[:, prompt_length - 1 : prompt_length - 1 + width]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1), mask


def top_k_log_probs(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Return the log-probs [..., V] of the distribution that top-k sampling draws from.

    The k largest logits are renormalized and every other token gets −inf.
    These are the decoding distribution's log-probs, which differ from the
    model's: score samples drawn with top-k by this function (or pass it as the
    proposal log-prob), never label it the model's log-prob. Ties at the k-th
    logit keep every tied token, as ``transformers``' top-k warper does.
    """
    vocabulary = logits.shape[-1]
    if not 1 <= top_k <= vocabulary:
        raise InvalidInputError(f"top_k must be between 1 and the vocabulary size {vocabulary}, got {top_k}")
    logits = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
    threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    kept = logits.masked_fill(logits < threshold, -torch.inf)
    return torch.log_softmax(kept, dim=-1)


def sequence_log_probs_with_grad(model, batch: SampleBatch) -> torch.Tensor:
    """Return log π(x) per sequence [B] in float64 on the model's device, keeping the autograd graph.

    ``model`` may be wrapped (for example in DistributedDataParallel); it is called, never unwrapped.
    """
    log_probs, mask = token_log_probs(model, batch)
    chosen = log_probs.gather(-1, batch.sequences.to(log_probs.device).unsqueeze(-1)).squeeze(-1)
    return masked_sum(chosen, mask)


@dataclass
class SequenceScores:
    """Per-sequence scores of one model on a sample; float64 tensors of shape [B]."""

    log_prob: torch.Tensor
    token_entropy_sum: torch.Tensor
    """Σ_t H(π(·|x<t)) along the sampled prefixes."""


LOGIT_BUDGET = 2**27
"""Most float32 logits (batch × length × vocabulary) held at once by a scoring pass, 512 MiB."""


def fitting_batch_size(batch_size: int, width: int, model) -> int:
    """Shrink ``batch_size`` so that one pass's full log-softmax stays within LOGIT_BUDGET.

    Models without a ``config.vocab_size`` keep the requested batch size.
    """
    vocabulary = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocabulary:
        return batch_size
    return max(1, min(batch_size, LOGIT_BUDGET // max(1, width * vocabulary)))


@torch.no_grad()
def score(model, batch: SampleBatch, batch_size: int = 256, progress: ProgressCallback | None = None) -> SequenceScores:
    """Score sequences with one model: log-prob and summed per-token entropy."""
    log_prob_parts, entropy_parts = [], []
    batch_size = fitting_batch_size(batch_size, batch.sequences.shape[1], model)
    for part in batch.batches(batch_size):
        log_probs, mask = token_log_probs(model, part)
        chosen = log_probs.gather(-1, part.sequences.to(log_probs.device).unsqueeze(-1)).squeeze(-1)
        log_prob_parts.append(masked_sum(chosen, mask).cpu())
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
        entropy_parts.append(masked_sum(entropy, mask).cpu())
        if progress is not None:
            progress(len(part))
    return SequenceScores(torch.cat(log_prob_parts), torch.cat(entropy_parts))


@torch.no_grad()
def score_pair(
    policy, base, batch: SampleBatch, batch_size: int = 256, progress: ProgressCallback | None = None
) -> tuple[SequenceScores, SequenceScores, torch.Tensor]:
    """Score with the policy and the base model on the same sequences.

    Also returns Σ_t KL(π(·|x<t) ‖ π0(·|x<t)) per sequence [B], the exact
    per-token KLs summed along the sampled prefixes. Its mean over x ∼ π is
    an unbiased, lower-variance estimate of the sequence-level KL(π‖π0).
    When ``policy`` is ``base`` (the same object), one forward pass serves
    both and the KLs are exactly 0.
    """
    if policy is base:
        scores = score(policy, batch, batch_size, progress)
        return scores, scores, torch.zeros_like(scores.log_prob)
    policy_parts, base_parts, kl_parts = [], [], []
    batch_size = fitting_batch_size(batch_size, batch.sequences.shape[1], policy)
    for part in batch.batches(batch_size):
        policy_log_probs, mask = token_log_probs(policy, part)
        base_log_probs, _ = token_log_probs(base, part)
        base_log_probs = base_log_probs.to(policy_log_probs.device)
        index = part.sequences.to(policy_log_probs.device).unsqueeze(-1)
        policy_probs = policy_log_probs.exp()
        token_kl = (policy_probs * (policy_log_probs - base_log_probs)).sum(dim=-1)
        entropy = -(policy_probs * policy_log_probs).sum(dim=-1)
        policy_parts.append(
            SequenceScores(
                masked_sum(policy_log_probs.gather(-1, index).squeeze(-1), mask).cpu(),
                masked_sum(entropy, mask).cpu(),
            )
        )
        base_entropy = -(base_log_probs.exp() * base_log_probs).sum(dim=-1)
        base_parts.append(
            SequenceScores(
                masked_sum(base_log_probs.gather(-1, index).squeeze(-1), mask).cpu(),
                masked_sum(base_entropy, mask).cpu(),
            )
        )
        kl_parts.append(masked_sum(token_kl, mask).cpu())
        if progress is not None:
            progress(len(part))

    def join(parts: list[SequenceScores]) -> SequenceScores:
        return SequenceScores(torch.cat([p.log_prob for p in parts]), torch.cat([p.token_entropy_sum for p in parts]))

    return join(policy_parts), join(base_parts), torch.cat(kl_parts)


def decode(tokenizer, batch: SampleBatch) -> list[str]:
    """Decode each continuation up to its length, dropping special tokens."""
    texts = []
    for row, length in zip(batch.sequences.tolist(), batch.lengths.tolist()):
        texts.append(tokenizer.decode(row[:length], skip_special_tokens=True))
    return texts


def model_dtype(model) -> torch.dtype:
    """Return the floating-point dtype of a model's parameters."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def score_continuations(
    model,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    pad_token_id: int,
    max_length: int | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Return log π(continuation | context) per row [B] in float64.

    Each row is its context followed by its continuation. Only the
    continuation's tokens are scored: the first one is predicted from the last
    context token, and no context token enters the sum. When a row is longer
    than ``max_length``, its context is truncated from the left, so the tokens
    nearest the continuation stay. Rows are left-padded to a common width with
    position ids that restart at 0 on each row's first real token, so a row
    scores the same alone or in any batch. Padding is masked from lengths, so
    ``pad_token_id`` may be a real token.
    """
    if len(contexts) != len(continuations):
        raise InvalidInputError(
            f"got {len(contexts)} contexts and {len(continuations)} continuations; give one context per continuation"
        )
    rows = [_context_and_continuation(index, context, continuation, max_length)
            for index, (context, continuation) in enumerate(zip(contexts, continuations))]
    parts = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            parts.append(_score_left_padded(model, rows[start : start + batch_size], pad_token_id))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _context_and_continuation(
    index: int, context: Sequence[int], continuation: Sequence[int], max_length: int | None
) -> tuple[list[int], int]:
    """Return one row's token ids (truncated context + continuation) and its continuation length."""
    context, continuation = list(context), list(continuation)
    if not context:
        raise InvalidInputError(
            f"row {index} has an empty context; give at least one context token (for example BOS), "
            "because the first continuation token is predicted from it"
        )
    if not continuation:
        raise InvalidInputError(f"row {index} has an empty continuation; give at least one token to score")
    if max_length is not None:
        if max_length < len(continuation) + 1:
            raise InvalidInputError(
                f"max_length {max_length} cannot hold row {index}'s {len(continuation)} continuation tokens "
                f"and one context token; raise max_length to at least {len(continuation) + 1}"
            )
        context = context[-(max_length - len(continuation)) :]
    return context + continuation, len(continuation)


def _score_left_padded(model, rows: list[tuple[list[int], int]], pad_token_id: int) -> torch.Tensor:
    """Score the continuations of one left-padded batch; see ``score_continuations``."""
    width = max(len(ids) for ids, _ in rows)
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    continuation_lengths = torch.tensor([length for _, length in rows])
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    for row, (ids, _) in enumerate(rows):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)

    device = model_device(model)
    input_ids, lengths, continuation_lengths = input_ids.to(device), lengths.to(device), continuation_lengths.to(device)

    # Left padding: row b's real tokens occupy positions width − lengths[b] .. width − 1.
    attention_mask = length_mask(lengths, width).flip(1)
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids).logits
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()

    # The logit at position i predicts token i + 1: targets are positions 1 .. width − 1.
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = input_ids[:, 1:]
    chosen = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    is_continuation = length_mask(continuation_lengths, width - 1).flip(1)
    return masked_sum(chosen, is_continuation).cpu()

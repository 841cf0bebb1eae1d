"""Prompts: loading them, encoding them as contexts, and the cluster bootstrap over them.

Each prompt c is a context: the model continues BOS + the prompt's tokens,
and only the continuation is sampled and scored. Every prompt has its own
target p_c ∝ π0(·|c)·Φ(·, c) and its own partition function Z_c.

An audit metric over prompts is the mean over prompts of a per-prompt
statistic. Its interval comes from a two-stage (cluster) bootstrap: draw the
prompts with replacement, then, within each drawn prompt, draw its policy
samples and its base samples with replacement, and recompute the mean. This
covers both the spread between prompts and the sampling error within each.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fdiv_eval.errors import InvalidInputError
from fdiv_eval.estimates import Estimate

logger = logging.getLogger(__name__)

DATASET_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Context:
    """One prompt: its text (None for unconditional generation) and the ids the model continues."""

    index: int
    text: str | None
    prompt_ids: torch.Tensor  # [P]


def load_prompts(config, base_dir: Path | None = None) -> list[str]:
    """Return the prompt strings of a suite's ``prompts`` section."""
    if config.texts:
        prompts = list(config.texts)
    else:
        prompts = _read_prompt_file(config.file, config.column, base_dir)
    if config.limit is not None:
        prompts = prompts[: config.limit]
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError(f"prompt {index} is empty or not a string ({prompt!r}); remove it or give text")
    if not prompts:
        raise InvalidInputError("the suite's prompts section yields no prompts; list some in prompts.texts")
    return prompts


def _read_prompt_file(file: str, column: str, base_dir: Path | None) -> list[str]:
    from datasets import load_dataset

    path = Path(file).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if not path.is_file():
        raise InvalidInputError(f"prompts file {file!r} not found; give a path relative to the suite file")
    builder = DATASET_BUILDERS.get(path.suffix)
    if builder is None:
        raise InvalidInputError(
            f"prompts file {file!r} has an unknown suffix {path.suffix!r}; use one of: {', '.join(DATASET_BUILDERS)}"
        )
    dataset = load_dataset(builder, data_files=str(path), split="train")
    name = "text" if builder == "text" else column
    if name not in dataset.column_names:
        raise InvalidInputError(
            f"prompts file {file!r} has no column {name!r}; set prompts.column to one of: {', '.join(dataset.column_names)}"
        )
    return [str(value) for value in dataset[name]]


def encode_prompt(tokenizer, text: str, chat_template: bool = False) -> torch.Tensor:
    """Return the token ids that the model continues for one prompt.

    Without ``chat_template``: BOS (EOS when the tokenizer has no BOS) and the
    prompt's tokens. With it: the tokenizer's chat template applied to the
    prompt as one user message, with the assistant turn opened, so the
    continuation is the assistant's reply.
    """
    from fdiv_eval.sequences import default_prompt

    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInputError(
                "prompts.chat_template is true but the base model's tokenizer has no chat template; "
                "set prompts.chat_template to false"
            )
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return torch.tensor(ids, dtype=torch.long)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.cat([default_prompt(tokenizer), torch.tensor(ids, dtype=torch.long)])


def build_contexts(tokenizer, prompts: list[str] | None, chat_template: bool = False) -> list[Context]:
    """Build one context per prompt, or the single unconditional context when ``prompts`` is None."""
    from fdiv_eval.sequences import default_prompt

    if prompts is None:
        return [Context(0, None, default_prompt(tokenizer))]
    return [Context(index, text, encode_prompt(tokenizer, text, chat_template)) for index, text in enumerate(prompts)]


def with_prompt(function, prompt: str | None):
    """Bind one prompt (None: no prompt) to a ``(texts, prompts)`` scorer, leaving a function of texts alone.

    Splitting the texts across torchrun ranks then needs no prompt bookkeeping.
    """
    return lambda texts: function(texts, None if prompt is None else [prompt] * len(texts))


def per_prompt_count(total: int, prompt_count: int) -> int:
    """Samples per prompt so that all prompts together get at least ``total`` (and each at least 2)."""
    return max(2, -(-total // prompt_count))


PromptStatistic = Callable[[int, np.ndarray, np.ndarray], float]
"""(prompt index, policy-sample indices, base-sample indices) → the statistic on those samples."""


def cluster_bootstrap(
    statistic: PromptStatistic,
    policy_counts: list[int],
    base_counts: list[int],
    resamples: int,
    seed: int,
    method: str = "mean-over-prompts+cluster-bootstrap",
) -> Estimate:
    """Mean over prompts of ``statistic``, with a two-stage bootstrap standard error and percentile 95% CI."""
    prompt_count = len(policy_counts)
    full = [np.arange(count) for count in policy_counts]
    full_base = [np.arange(count) for count in base_counts]
    values = np.array([statistic(c, full[c], full_base[c]) for c in range(prompt_count)], dtype=np.float64)
    value = float(values.mean())
    n = int(sum(policy_counts))
    if not math.isfinite(value):
        return Estimate(value, 0.0, value, value, n, method)

    generator = np.random.default_rng(seed)
    replicates = np.empty(resamples)
    for b in range(resamples):
        chosen = generator.integers(0, prompt_count, size=prompt_count)
        total = 0.0
        for c in chosen:
            policy_rows = generator.integers(0, policy_counts[c], size=policy_counts[c])
            base_rows = generator.integers(0, base_counts[c], size=base_counts[c])
            total += statistic(int(c), policy_rows, base_rows)
        replicates[b] = total / prompt_count
    finite = replicates[np.isfinite(replicates)]
    if finite.size < 2:
        return Estimate(value, math.nan, math.nan, math.nan, n, method)
    low, high = np.quantile(finite, [0.025, 0.975])
    return Estimate(value, float(finite.std(ddof=1)), float(low), float(high), n, method)

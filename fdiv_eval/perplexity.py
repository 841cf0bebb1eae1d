"""Perplexity of texts under a causal LM, per text and over a corpus.

Natural logs: a mean negative log-likelihood (NLL) of m nats per token is a
perplexity of e^m, not 2^m. Two aggregates exist and differ, so they carry
separate names and neither is called plain "perplexity":

- ``mean_per_text_perplexity``: the mean over texts of exp(mean token NLL of
  the text);
- ``corpus_perplexity``: exp(total NLL / total tokens), the token-weighted
  form, which long texts dominate.

The perplexity of one text is exp(mean token NLL), never the mean of exp(NLL)
over its tokens. Padding is masked from lengths, never from token values,
so the result does not depend on batch size, padding side or a pad id that
is also a real token.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fdiv_eval.errors import InvalidInputError
from fdiv_eval.sequences import length_mask

logger = logging.getLogger(__name__)

PADDING_SIDES = ("right", "left")


@dataclass(frozen=True)
class PerplexityResult:
    """Summed NLL and token count of each text, and the perplexities derived from them."""

    negative_log_likelihoods: np.ndarray
    """Σ −log π(token | prefix) per text, in nats (float64)."""
    token_counts: np.ndarray
    """Number of scored tokens per text."""

    @property
    def per_text_perplexity(self) -> np.ndarray:
        """exp(mean token NLL) of each text; NaN for a text with no scored token."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.exp(self.negative_log_likelihoods / self.token_counts)

    @property
    def mean_per_text_perplexity(self) -> float:
        """Mean over texts of the per-text perplexity; texts with no scored token are left out."""
        values = self.per_text_perplexity[self.token_counts > 0]
        return float(values.mean()) if values.size else math.nan

    @property
    def corpus_perplexity(self) -> float:
        """exp(Σ NLL / Σ tokens) over all texts, the token-weighted perplexity."""
        total = int(self.token_counts.sum())
        return math.exp(float(self.negative_log_likelihoods.sum()) / total) if total else math.nan

    def to_dict(self) -> dict:
        return {
            "corpus_perplexity": self.corpus_perplexity,
            "mean_per_text_perplexity": self.mean_per_text_perplexity,
            "per_text_perplexity": self.per_text_perplexity.tolist(),
            "token_counts": self.token_counts.tolist(),
        }


def perplexity_from_log_probs(token_log_probs: Sequence[Sequence[float]]) -> PerplexityResult:
    """Build a ``PerplexityResult`` from the log-probs (nats) of each text's scored tokens."""
    sums, counts = [], []
    for index, values in enumerate(token_log_probs):
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if np.isnan(values).any() or (values > 0).any():
            raise InvalidInputError(f"text {index} has log-probs that are NaN or above 0: {values.tolist()}")
        sums.append(-float(values.sum()))
        counts.append(values.size)
    return PerplexityResult(np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.int64))


@torch.no_grad()
def text_token_log_probs(
    model,
    token_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 16,
    padding_side: str = "right",
) -> list[np.ndarray]:
    """Return log π(token_i | tokens_<i) for i ≥ 1 of each row, as float64 arrays.

    The first token of a row is context only (usually BOS). Rows are padded
    on ``padding_side`` with position ids that start at 0 on each row's first
    real token, so a row's values are the same alone or in any batch.
    """
    if padding_side not in PADDING_SIDES:
        raise InvalidInputError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
    rows = [list(ids) for ids in token_ids]
    for index, ids in enumerate(rows):
        if len(ids) < 2:
            raise InvalidInputError(
                f"text {index} has {len(ids)} token(s); perplexity needs a context token (BOS) and one token to score"
            )
    results: list[np.ndarray] = []
    for start in range(0, len(rows), batch_size):
        results += _batch_token_log_probs(model, rows[start : start + batch_size], pad_token_id, padding_side)
        logger.debug("scored %d of %d texts", min(start + batch_size, len(rows)), len(rows))
    return results


def _batch_token_log_probs(model, rows: list[list[int]], pad_token_id: int, padding_side: str) -> list[np.ndarray]:
    width = max(len(ids) for ids in rows)
    lengths = torch.tensor([len(ids) for ids in rows])
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = length_mask(lengths, width)
    if padding_side == "left":
        attention_mask = attention_mask.flip(1)
    for row, ids in enumerate(rows):
        start = width - len(ids) if padding_side == "left" else 0
        input_ids[row, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)

    logits = model(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids).logits
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    chosen = log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1).double()

    # A target is scored when it and the token that predicts it are both real.
    scored = attention_mask[:, 1:] & attention_mask[:, :-1]
    return [chosen[row][scored[row]].numpy() for row in range(len(rows))]


def perplexity(
    model,
    token_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 16,
    padding_side: str = "right",
) -> PerplexityResult:
    """Compute per-text and corpus perplexity of token rows; each row's first token is context only."""
    return perplexity_from_log_probs(text_token_log_probs(model, token_ids, pad_token_id, batch_size, padding_side))


def perplexity_of_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 16) -> PerplexityResult:
    """Tokenize ``texts``, prepend BOS (EOS when there is no BOS) and compute their perplexity.

    Every token of each text is scored, the first one given BOS.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise InvalidInputError("the tokenizer has neither a BOS nor an EOS token to start each text with")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    rows = [[start, *tokenizer(text, add_special_tokens=False)["input_ids"]] for text in texts]
    return perplexity(model, rows, pad, batch_size=batch_size)

"""The embedded base model: a small GPT-2 trained on Jane Austen's six novels.

The shipped checkpoint in ``fdiv_eval/base_model/`` is what ``fdiv base build``
writes: a byte-level BPE tokenizer (512 tokens, ``<|endoftext|>`` as BOS and
EOS, a separate ``<|pad|>``) and a 4-layer, 128-wide ``GPT2LMHeadModel``
trained on the sentences of the corpus in ``fdiv_eval/data/austen.txt.gz``.
Each training example is ``<|endoftext|> sentence <|endoftext|>``, so an
unconditional sample from BOS reads like one Austen sentence and usually ends
with EOS.

Perplexity is per token, in the model's own tokens, on held-out sentences
(every 20th sentence of the corpus).
"""

from __future__ import annotations

import gzip
import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
EMBEDDED_MODEL_NAME = "embedded:austen"


def embedded_model_path() -> Path:
    """Return the folder of the shipped base checkpoint."""
    return Path(str(resources.files("fdiv_eval") / "base_model"))


def corpus_path() -> Path:
    return Path(str(resources.files("fdiv_eval") / "data" / "austen.txt.gz"))


@dataclass(frozen=True)
class BaseModelConfig:
    """Settings of ``fdiv base build``; the defaults produce the shipped model."""

    vocab_size: int = 512
    """Tokenizer size, including the two special tokens."""
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    max_length: int = 64
    """Maximum training example length in tokens (BOS and EOS included); longer sentences are truncated."""
    batch_size: int = 64
    steps: int = 2000
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    validation_every: int = 20
    """Every this-many-th sentence is held out for validation."""


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"']?[A-Z])")
_HEADING = re.compile(r"^#|^(?:CHAPTER|VOLUME|Chapter|by Jane Austen)\b|^[A-Z\s\d.,]+$")


def split_sentences(corpus: str) -> list[str]:
    """Split the corpus into sentences, dropping headings and fragments under 3 words."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", corpus):
        paragraph = " ".join(paragraph.split())
        if not paragraph or _HEADING.match(paragraph):
            continue
        for sentence in _SENTENCE_END.split(paragraph):
            sentence = sentence.strip()
            if len(sentence.split()) >= 3:
                sentences.append(sentence)
    return sentences


def load_sentences() -> list[str]:
    with gzip.open(corpus_path(), "rt", encoding="utf-8") as stream:
        return split_sentences(stream.read())


def train_tokenizer(sentences: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sentences, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=BOS_TOKEN,
        unk_token=None,
        pad_token=PAD_TOKEN,
        model_max_length=128,
    )


def _encode_examples(tokenizer, sentences: list[str], max_length: int) -> list[list[int]]:
    bos = tokenizer.bos_token_id
    examples = []
    for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]:
        examples.append(([bos] + ids + [bos])[:max_length])
    return examples


def _batch(examples: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example)] = torch.tensor(example)
        mask[row, : len(example)] = 1
    return input_ids, mask


def _mean_token_loss(model, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Return the summed next-token negative log-likelihood and the number of predicted tokens."""
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    target_mask = mask[:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll[target_mask].sum(), int(target_mask.sum())


@torch.no_grad()
def validation_perplexity(model, examples: list[list[int]], pad_id: int, batch_size: int = 256) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        input_ids, mask = _batch(examples[start : start + batch_size], pad_id)
        loss, n = _mean_token_loss(model, input_ids, mask)
        total += float(loss)
        count += n
    return math.exp(total / count)


def build_base_model(
    output: Path,
    config: BaseModelConfig = BaseModelConfig(),
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Train the tokenizer and the GPT-2 from scratch and save both to ``output``.

    The result depends only on the config, the corpus, the torch version and
    the number of CPU threads (which changes the order of float sums).
    ``progress(step, total_steps, loss)`` is called after each step. Returns a
    summary with the validation perplexity.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(config.seed)
    sentences = load_sentences()
    validation = sentences[:: config.validation_every]
    training = [s for i, s in enumerate(sentences) if i % config.validation_every != 0]
    tokenizer = train_tokenizer(training, config.vocab_size)
    train_examples = _encode_examples(tokenizer, training, config.max_length)
    validation_examples = _encode_examples(tokenizer, validation, config.max_length)
    logger.info("%d training and %d validation sentences", len(train_examples), len(validation_examples))

    model_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    def learning_rate_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_fraction = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress_fraction))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(train_examples), generator=generator).tolist()
    cursor = 0

    model.train()
    for step in range(config.steps):
        if cursor + config.batch_size > len(order):
            order = torch.randperm(len(train_examples), generator=generator).tolist()
            cursor = 0
        batch = [train_examples[i] for i in order[cursor : cursor + config.batch_size]]
        cursor += config.batch_size
        input_ids, mask = _batch(batch, tokenizer.pad_token_id)
        loss_sum, count = _mean_token_loss(model, input_ids, mask)
        loss = loss_sum / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if progress is not None:
            progress(step + 1, config.steps, float(loss))

    perplexity = validation_perplexity(model, validation_examples, tokenizer.pad_token_id)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    staging.chmod(0o755)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if output.exists():
        shutil.rmtree(output)
    staging.replace(output)
    return {
        "validation_perplexity": perplexity,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_sentences": len(train_examples),
        "validation_sentences": len(validation_examples),
    }

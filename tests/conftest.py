"""Shared fixtures: an enumerable toy GPT-2 and small suites on the embedded model.

The toy has a vocabulary of 4 tokens: 0 is BOS, EOS and pad at once (the case
where masks must come from lengths, not token values), and 1–3 are words.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOY_VOCAB = 4
TOY_EOS = 0


def make_toy_model(seed: int = 0, n_embd: int = 16, scale: float = 1.0):
    """A randomly initialized 1-layer GPT-2 over 4 tokens, in eval mode, float32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=TOY_VOCAB, n_positions=16, n_embd=n_embd, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=TOY_EOS, eos_token_id=TOY_EOS, pad_token_id=TOY_EOS,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        # Larger logits make the distribution far from uniform.
        model.lm_head.weight.mul_(scale)
    model.eval()
    return model


def enumerate_sequences(horizon: int, vocab: int = TOY_VOCAB, eos: int = TOY_EOS) -> list[list[int]]:
    """Every continuation: words then EOS (length ≤ horizon), or `horizon` words without EOS."""
    words = [token for token in range(vocab) if token != eos]
    sequences = []
    for length in range(1, horizon + 1):
        for prefix in itertools.product(words, repeat=length - 1):
            sequences.append([*prefix, eos])
    sequences += [list(s) for s in itertools.product(words, repeat=horizon)]
    return sequences


def sequences_to_batch(sequences: list[list[int]], pad: int = TOY_EOS):
    from fdiv_eval.sequences import SampleBatch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
    lengths = torch.tensor([len(s) for s in sequences])
    return SampleBatch(torch.tensor([TOY_EOS]), ids, lengths)


def save_toy_checkpoint(folder, seed: int = 0, scale: float = 2.0):
    """Save the toy model with a word-level tokenizer ("<eos>", "a", "b", "c") to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1, "b": 2, "c": 3}, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<eos>", eos_token="<eos>",
                                      pad_token="<eos>")
    make_toy_model(seed=seed, scale=scale).save_pretrained(folder)
    wrapped.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def toy_checkpoint(tmp_path):
    return save_toy_checkpoint(tmp_path / "toy-base")


@pytest.fixture
def toy_model():
    return make_toy_model(scale=3.0)


TINY_SUITE = """
name: tiny
base_model: embedded:austen
max_new_tokens: 12
target:
  type: word_list
  words: [she, her, he]
  epsilon: 0.001
train:
  methods: [rlhf, gdc, js, tv]
  steps: 3
  batch_size: 16
  checkpoint_every: 2
  log_partition_samples: 128
audit:
  samples: 64
  base_samples: 128
  batch_size: 64
  self_bleu_samples: 20
  bootstrap_resamples: 20
runs_dir: {runs}
report_dir: {reports}
"""


@pytest.fixture
def tiny_suite(tmp_path):
    """Write the tiny suite into tmp_path and return its path."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SUITE.format(runs=tmp_path / "runs", reports=tmp_path / "reports"))
    return path

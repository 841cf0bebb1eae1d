"""One f-DPG step on fixed samples, run under torchrun by tests/test_distributed.py.

Every rank draws the same seeded samples, keeps its own share of each
prompt's rows, and runs the trainer's scoring, gathering and backward pass
through DistributedDataParallel. Rank 0 saves the resulting gradients, loss
and running log Ẑ sums, which the test compares with one process on all rows.

Usage: torchrun --nproc-per-node N distributed_worker.py OUTPUT BASELINE PER_PROMPT [PROMPT ...]
"""

from __future__ import annotations

import sys

import torch


def run_step(output: str | None, baseline: str, per_prompt: int, prompts: list[str] | None) -> dict:
    from fdiv_eval.distributed import current, setup, share_bounds, teardown
    from fdiv_eval.divergences import get_divergence
    from fdiv_eval.prompts import build_contexts
    from fdiv_eval.sequences import load_model, load_tokenizer, sample
    from fdiv_eval.targets import PointwiseTarget, WordListFeature
    from trainers.fdpg import _wrap_for_gradients, backward_step, gather_step_samples, score_step_samples

    runtime = setup("cpu")
    tokenizer = load_tokenizer("embedded:austen")
    policy = load_model("embedded:austen")
    base = load_model("embedded:austen")
    target = PointwiseTarget(WordListFeature(("the", "and", "she")), epsilon=0.01)
    contexts = build_contexts(tokenizer, prompts, chat_template=False)

    # The same rows on every rank; each keeps its contiguous share of every prompt's rows.
    start, stop = share_bounds(per_prompt, runtime.rank, runtime.world_size)
    batches = []
    for context in contexts:
        rows = sample(base, context.prompt_ids, per_prompt, 8, tokenizer.eos_token_id, tokenizer.pad_token_id,
                      seed=11 + context.index)
        batches.append(rows.slice(start, stop))

    trained = _wrap_for_gradients(policy, runtime)
    local = score_step_samples(trained, base, tokenizer, target, contexts, batches)
    gathered = gather_step_samples(local, contexts, per_prompt, runtime)
    log_z_sums, log_z_counts = [-1.0] * len(contexts), [64] * len(contexts)
    outcome = backward_step(get_divergence("js"), baseline, local, gathered, contexts, log_z_sums, log_z_counts,
                            runtime)
    result = {
        "gradients": {name: parameter.grad.clone() for name, parameter in policy.named_parameters()},
        "loss": float(outcome.step_loss.loss.detach()),
        "log_z_sums": log_z_sums,
        "log_z_counts": log_z_counts,
        "texts": gathered.texts,
    }
    if output is not None and current().is_main:
        torch.save(result, output)
    teardown()
    return result


if __name__ == "__main__":
    import transformers

    transformers.utils.logging.disable_progress_bar()
    arguments = sys.argv[1:]
    run_step(arguments[0], arguments[1], int(arguments[2]), arguments[3:] or None)

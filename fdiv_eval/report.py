"""Comparison reports: versioned JSON, Markdown and a rich terminal table.

The JSON schema is documented in ``docs/report-schema.md``; bump
``SCHEMA_VERSION`` on any change that breaks a reader.
"""

from __future__ import annotations

import datetime as _datetime
import json
import math
import os
from pathlib import Path
from typing import Any

from fdiv_eval import __version__
from fdiv_eval.conventions import compatibility_record, record_from_legacy, unit_name
from fdiv_eval.estimates import Estimate, encode_float
from fdiv_eval.errors import InvalidInputError
from fdiv_eval.metrics import METRICS, SUMMARY_METRICS, arrow, metric_info

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
"""Version 1 lacks ``compatibility``; ``load_report`` derives it from the other fields."""

CONVENTIONS = (
    "Natural logarithms; KL, JS and entropies in nats. JS is the Jensen-Shannon divergence "
    "(no square root), TV = 1/2 sum |pi - p|, Hellinger is squared: 1 - sum sqrt(pi p). "
    "Intervals are 95% confidence intervals."
)


def build_report(
    suite_name: str,
    suite_hash: str,
    target: dict,
    log_partition: Estimate,
    models: list[dict],
    settings: dict,
    elapsed_seconds: float | None = None,
    pairwise: dict | None = None,
) -> dict[str, Any]:
    """Assemble the report document.

    Each entry of ``models`` has ``name``, ``model`` (path or id),
    ``metrics`` (name → Estimate) and optionally ``method``, ``samples_file``
    and ``info``.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "generator": f"fdiv-eval {__version__}",
        "created": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
        "suite": {"name": suite_name, "hash": suite_hash},
        "conventions": CONVENTIONS,
        "compatibility": compatibility_record(suite_name, target, settings.get("base_model"),
                                              settings.get("max_new_tokens")),
        "target": target,
        "settings": settings,
        "log_partition": log_partition.to_dict(),
        "metrics": {
            name: {"label": info.label, "direction": info.direction, "unit": info.unit,
                   "description": info.description, "name_with_unit": unit_name(name, info)}
            for name, info in METRICS.items()
        },
        "models": [
            {
                "name": entry["name"],
                "model": entry["model"],
                "method": entry.get("method"),
                "samples_file": entry.get("samples_file"),
                "info": {k: encode_float(v) for k, v in entry.get("info", {}).items()},
                "metrics": {name: estimate.to_dict() for name, estimate in entry["metrics"].items()},
            }
            for entry in models
        ],
        "pairwise": pairwise,
        "elapsed_seconds": elapsed_seconds,
    }


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_json(report: dict, path: Path) -> None:
    write_atomic(path, json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def load_report(path: str | Path) -> dict:
    """Read a report.json, checking its schema version."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise InvalidInputError(f"report {str(path)!r} not found; pass a report.json or the folder that contains it")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"report {str(path)!r} is not valid JSON: {error}") from error
    version = report.get("schema_version") if isinstance(report, dict) else None
    if version not in READABLE_SCHEMA_VERSIONS:
        raise InvalidInputError(
            f"report {str(path)!r} has schema_version {version!r}; this fdiv-eval reads versions "
            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}"
        )
    if "compatibility" not in report:
        report["compatibility"] = record_from_legacy(report)
    return report


def model_estimates(entry: dict) -> dict[str, Estimate]:
    return {name: Estimate.from_dict(data) for name, data in entry["metrics"].items()}


def format_number(value: float) -> str:
    """Format with 3 significant digits; ∞ and nan spelled out."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e4 or magnitude < 1e-3:
        return f"{value:.2e}"
    return f"{value:.3g}"


def format_estimate(estimate: Estimate, with_interval: bool = True, separator: str = " ") -> str:
    """Render ``value [low, high]``, with ``(!)`` after an unreliable estimate."""
    text = format_number(estimate.value)
    if not estimate.reliable:
        text += " (!)"
    if with_interval and math.isfinite(estimate.value):
        text += f"{separator}[{format_number(estimate.ci_low)}, {format_number(estimate.ci_high)}]"
    if estimate.exact is not None:
        text += f"{separator}exact {format_number(estimate.exact)}"
    return text


def metric_header(name: str) -> str:
    info = metric_info(name)
    mark = arrow(info.direction)
    return f"{info.label} {mark}".strip()


def _pairwise_markdown(pairwise: dict) -> list[str]:
    names = pairwise["models"]
    lines = ["## Divergences between models", "", pairwise["description"] + ".", ""]
    for key, title in (("kl", "KL(row‖column)"), ("js", "JS")):
        lines += [f"| {title} | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for row_name, row in zip(names, pairwise[key]):
            cells = [format_estimate(Estimate.from_dict(cell)) for cell in row]
            lines.append(f"| {row_name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def render_markdown(report: dict) -> str:
    """Render the report as Markdown: one table of all metrics, models as columns."""
    models = report["models"]
    log_z = Estimate.from_dict(report["log_partition"])
    lines = [
        f"# fdiv-eval report: {report['suite']['name']}",
        "",
        f"Suite hash `{report['suite']['hash']}`, created {report['created']} by {report['generator']}.",
        "",
        f"Target: `{report['target'].get('formula', report['target'])}`",
        target_parameters(report["target"]),
        "",
        f"log Z = {format_estimate(log_z)} from {log_z.n} base-model samples ({log_z.method}).",
        "",
        report["conventions"] + " ↓ lower is better, ↑ higher is better; (!) marks an estimate flagged "
        "unreliable (Pareto k̂ > 0.7 or effective sample size below 10).",
        "",
    ]
    header = "| metric | " + " | ".join(entry["name"] for entry in models) + " |"
    lines += [header, "|" + "---|" * (len(models) + 1)]
    estimates = [model_estimates(entry) for entry in models]
    for name in [*METRICS, *target_metric_names(report)]:
        if not any(name in e for e in estimates):
            continue
        cells = [format_estimate(e[name]) if name in e else "" for e in estimates]
        lines.append(f"| {metric_header(name)} | " + " | ".join(cells) + " |")
    lines.append("")
    if report.get("pairwise"):
        lines += _pairwise_markdown(report["pairwise"])
    lines.append("## Notes")
    lines.append("")
    for entry, estimate_map in zip(models, estimates):
        for name, estimate in estimate_map.items():
            for note in estimate.notes:
                lines.append(f"- {entry['name']}, {name}: {note}")
    lines.append("")
    lines += _per_prompt_lines(report)
    lines.append("## Metrics")
    lines.append("")
    for name, info in METRICS.items():
        unit = f" ({info.unit})" if info.unit else ""
        lines.append(f"- **{info.label}**{unit}: {info.description}.")
    lines.append("")
    return "\n".join(lines)


def _per_prompt_lines(report: dict) -> list[str]:
    """Markdown lines that list, per model, the prompts with the lowest and highest key metrics."""
    from fdiv_eval.conditional import prompt_extremes

    models = [entry for entry in report["models"] if entry.get("info", {}).get("per_prompt")]
    if not models:
        return []
    lines = ["## Per-prompt extremes", ""]
    for entry in models:
        rows = entry["info"]["per_prompt"]
        keys = [key for key in ("reward", "constraint_satisfaction", "js") if key in rows[0]]
        keys = [key for key in rows[0] if key.startswith("moment/")] + keys
        lines.append(f"### {entry['name']} ({len(rows)} prompts)")
        lines.append("")
        for key in keys:
            extremes = prompt_extremes(rows, key)
            for side in ("lowest", "highest"):
                shown = "; ".join(f"{format_number(value)} for {prompt!r}" for prompt, value in extremes[side])
                lines.append(f"- {metric_header(key)}, {side}: {shown}")
        lines.append("")
    return lines


def target_metric_names(report: dict) -> list[str]:
    """Names of the per-feature metrics that the report's models carry, in first-seen order."""
    names: list[str] = []
    for entry in report["models"]:
        for name in entry["metrics"]:
            if name not in METRICS and name not in names:
                names.append(name)
    return names


def target_parameters(target: dict) -> str:
    """One line with the parameters of the target, by kind."""
    kind = target.get("type")
    if kind == "distributional":
        coefficients = target.get("coefficients") or [None] * len(target["features"])
        fit = target.get("fit") or {}
        achieved = fit.get("achieved_moments", {})
        parts = []
        for feature, coefficient in zip(target["features"], coefficients):
            part = f"{feature['name']}: desired moment {feature['moment']:g}, lambda = "
            part += format_number(coefficient) if coefficient is not None else "?"
            if feature["name"] in achieved:
                part += f", achieved on the fit sample {format_estimate(Estimate.from_dict(achieved[feature['name']]))}"
            parts.append(part)
        tail = (f" (fitted on {fit['samples']} base samples in {fit['iterations']} Newton steps, "
                f"ESS {format_number(fit['effective_sample_size'])})") if fit else ""
        return "Features " + "; ".join(parts) + tail + "."
    if kind == "reward":
        return f"Reward {target['reward']} with beta = {target['beta']}."
    if kind == "pointwise":
        return f"Constraint {target.get('constraint')} and epsilon = {target.get('epsilon')}."
    return f"with words {target.get('words')} and epsilon = {target.get('epsilon')}."


def print_table(report: dict, console=None, metric_names=SUMMARY_METRICS) -> None:
    """Print one row per model, each metric as value [95% CI], with ↓/↑ marking the better direction."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    log_z = Estimate.from_dict(report["log_partition"])
    table = Table(
        title=f"{report['suite']['name']}: log Z = {format_estimate(log_z)}",
        caption="value \\[95% CI]; KL, JS and entropies in nats, E_π\\[b] and TV as fractions; ↓ lower is better, "
                "↑ higher is better; (!) unreliable estimate",
    )
    table.add_column("model", style="bold")
    metric_names = [*metric_names, *(n for n in [*target_metric_names(report), "reward", "target_reward", "rlhf_objective"]
                                     if n not in metric_names and any(n in e["metrics"] for e in report["models"]))]
    for name in metric_names:
        table.add_column(escape(metric_header(name)), justify="right")
    for entry in report["models"]:
        estimates = model_estimates(entry)
        row = [entry["name"]]
        for name in metric_names:
            row.append(format_estimate(estimates[name], separator="\n") if name in estimates else "")
        table.add_row(*row)
    console.print(table)
    if report.get("pairwise"):
        _print_pairwise(report["pairwise"], console)


def _print_pairwise(pairwise: dict, console) -> None:
    from rich.table import Table

    names = pairwise["models"]
    table = Table(title="Jensen–Shannon divergence between models (nats)")
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    for row_name, row in zip(names, pairwise["js"]):
        table.add_row(row_name, *[format_estimate(Estimate.from_dict(cell), separator="\n") for cell in row])
    console.print(table)

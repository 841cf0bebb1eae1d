"""Side-by-side comparison of audit reports: one document, four renderings.

``build_comparison`` reads two or more report.json files and rejects reports
whose conventions or experiment differ, naming the field. It then gathers
everything the renderings show into one JSON-ready document: each model's
estimates, the best model per metric, sample texts from the Parquet files,
training curves from the trainer's ``train_log.jsonl``, a pairwise divergence
matrix when a report carries one, and the settings and versions. The terminal
table and Markdown are rendered here; the HTML page in ``html_report``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fdiv_eval import __version__
from fdiv_eval.conventions import check_compatible, unit_name
from fdiv_eval.estimates import Estimate
from fdiv_eval.errors import InvalidInputError
from fdiv_eval.metrics import METRICS, SUMMARY_METRICS, arrow
from fdiv_eval.report import format_estimate, load_report

logger = logging.getLogger(__name__)

COMPARISON_VERSION = 1

DECODING = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
"""Pure ancestral sampling, which every audit uses whatever the checkpoint's generation config sets."""

SAMPLE_TEXTS = 8
"""Sample texts per model in the comparison, the first ones of each samples file (a random subset)."""

CURVE_KEYS = ("train/constraint_satisfaction", "train/kl_to_base", "train/log_partition", "train/loss")
"""Training-log series kept besides the on-batch divergences (``*_on_batch``) and rewards (``*reward*``)."""


def _report_label(path: Path, report: dict, taken: set[str]) -> str:
    label = path.name if path.is_dir() else path.parent.name
    label = label or report["suite"]["name"]
    candidate, index = label, 2
    while candidate in taken:
        candidate, index = f"{label}-{index}", index + 1
    return candidate


def _train_log(entry: dict, report: dict, runs_dirs: list[Path]) -> Path | None:
    """Find the training log of a model: under --runs, the report's runs folder, or beside the checkpoint."""
    names = [name for name in (entry.get("method"), entry["name"]) if name]
    candidates = [folder / name / "train_log.jsonl" for folder in runs_dirs for name in names]
    runs_dir = report.get("settings", {}).get("runs_dir")
    if runs_dir:
        candidates += [Path(runs_dir) / name / "train_log.jsonl" for name in names]
    model_path = Path(entry["model"])
    if model_path.name == "final" or model_path.name.startswith("step-"):
        candidates.append(model_path.parent / "train_log.jsonl")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def read_training_curve(path: Path) -> dict[str, list]:
    """Read a train_log.jsonl into columns: ``step`` and the kept numeric series."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"training log {str(path)!r} line {number} is not valid JSON: {error}") from error
    keys = []
    for record in records:
        for key in record:
            selected = key in CURVE_KEYS or key.endswith("_on_batch") or "reward" in key
            if selected and "std" not in key and key not in keys:
                keys.append(key)
    curve: dict[str, list] = {"step": [record.get("step") for record in records]}
    for key in keys:
        curve[key] = [_number_or_none(record.get(key)) for record in records]
    return curve


def _number_or_none(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _sample_texts(folder: Path, entry: dict, count: int) -> list[dict]:
    samples_file = entry.get("samples_file")
    if not samples_file or not (folder / samples_file).is_file():
        return []
    from datasets import Dataset

    dataset = Dataset.from_parquet(str(folder / samples_file))
    rows = dataset.select(range(min(count, len(dataset))))
    texts = []
    for row in rows:
        texts.append({
            "text": row["text"],
            "constraint": bool(row["constraint"]) if "constraint" in row else None,
            "log_prob": _number_or_none(row.get("log_prob")),
            "length": row.get("length"),
        })
    return texts


def _best_rows(models: list[dict], metric: str) -> list[str]:
    """Rows with the best reliable, finite value of a metric with a direction; ties share the mark."""
    direction = METRICS[metric].direction if metric in METRICS else "none"
    if direction not in ("lower", "higher"):
        return []
    candidates = []
    for model in models:
        data = model["metrics"].get(metric)
        if data is None:
            continue
        estimate = Estimate.from_dict(data)
        if estimate.reliable and math.isfinite(estimate.value):
            candidates.append((estimate.value, model["name"]))
    if not candidates:
        return []
    best = min(v for v, _ in candidates) if direction == "lower" else max(v for v, _ in candidates)
    return [name for value, name in candidates if value == best]


def _pairwise(report: dict) -> Any:
    return report.get("pairwise")


def build_comparison(paths: list[str | Path], runs_dirs: list[str | Path] | None = None,
                     sample_texts: int = SAMPLE_TEXTS) -> dict[str, Any]:
    """Load reports, check they are comparable, and gather the comparison document."""
    if len(paths) < 1:
        raise InvalidInputError("compare needs at least one report.json")
    runs_dirs = [Path(folder) for folder in (runs_dirs or [])]
    for folder in runs_dirs:
        if not folder.is_dir():
            raise InvalidInputError(f"--runs folder {str(folder)!r} not found; pass the runs_dir of the suite")

    loaded = []
    for path in paths:
        path = Path(path)
        report = load_report(path)
        loaded.append((path, path if path.is_dir() else path.parent, report))
    first_path, _, first = loaded[0]
    for path, _, report in loaded[1:]:
        check_compatible(first["compatibility"], report["compatibility"], str(first_path), str(path))

    labels: set[str] = set()
    reports, models = [], []
    row_names = [entry["name"] for _, _, report in loaded for entry in report["models"]]
    for index, (path, folder, report) in enumerate(loaded):
        label = _report_label(path, report, labels)
        labels.add(label)
        reports.append({
            "label": label,
            "path": str(path),
            "suite": report["suite"],
            "created": report.get("created"),
            "generator": report.get("generator"),
            "settings": report.get("settings", {}),
            "log_partition": report["log_partition"],
            "elapsed_seconds": report.get("elapsed_seconds"),
            "pairwise": _pairwise(report),
        })
        for entry in report["models"]:
            name = entry["name"] if row_names.count(entry["name"]) == 1 else f"{entry['name']}@{label}"
            log_path = _train_log(entry, report, runs_dirs)
            models.append({
                "name": name,
                "report": label,
                "model": entry["model"],
                "method": entry.get("method"),
                "info": entry.get("info", {}),
                "metrics": entry["metrics"],
                "samples": _sample_texts(folder, entry, sample_texts),
                "train_log": str(log_path) if log_path else None,
                "training_curve": read_training_curve(log_path) if log_path else None,
            })

    metric_keys = [key for key in METRICS if any(key in model["metrics"] for model in models)]
    metric_keys += sorted({key for model in models for key in model["metrics"]} - set(metric_keys))
    metrics = []
    for key in metric_keys:
        info = METRICS.get(key)
        metrics.append({
            "key": key,
            "name_with_unit": unit_name(key, info),
            "label": info.label if info else key,
            "unit": info.unit if info else "",
            "direction": info.direction if info else "none",
            "description": info.description if info else "",
            "best": _best_rows(models, key),
        })
    return {
        "comparison_version": COMPARISON_VERSION,
        "generator": f"fdiv-eval {__version__}",
        "compatibility": first["compatibility"],
        "conventions": first.get("conventions"),
        "target": first.get("target"),
        "decoding": DECODING,
        "reports": reports,
        "metrics": metrics,
        "models": models,
    }


def comparison_json(comparison: dict) -> str:
    """Strict JSON text of the comparison (non-finite numbers are already strings in the estimates)."""
    return json.dumps(comparison, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _summary_keys(comparison: dict, metric_names) -> list[dict]:
    by_key = {metric["key"]: metric for metric in comparison["metrics"]}
    return [by_key[name] for name in metric_names if name in by_key]


def _header(metric: dict) -> str:
    return f"{metric['label']} {arrow(metric['direction'])}".strip()


def print_comparison(comparison: dict, console=None, metric_names=SUMMARY_METRICS) -> None:
    """Print one row per model and one column per metric as value [95% CI]; the best value per column in bold green."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    suite = comparison["compatibility"]["suite"]
    table = Table(
        title=f"{suite}: {count_noun(len(comparison['models']), 'model')} from "
              f"{count_noun(len(comparison['reports']), 'report')}",
        caption="value [95% CI]; ↓ lower is better, ↑ higher is better; best per column in bold green; "
                "(!) unreliable estimate (Pareto k̂ > 0.7 or ESS < 10)",
    )
    table.add_column("model", style="bold")
    metrics = _summary_keys(comparison, metric_names)
    for metric in metrics:
        table.add_column(escape(_header(metric)), justify="right")
    for model in comparison["models"]:
        row: list[Any] = [escape(model["name"])]
        for metric in metrics:
            data = model["metrics"].get(metric["key"])
            if data is None:
                row.append("")
                continue
            estimate = Estimate.from_dict(data)
            style = "bold green" if model["name"] in metric["best"] else ""
            if not estimate.reliable:
                style = (style + " yellow").strip() if not style else style
            row.append(Text(format_estimate(estimate, separator="\n"), style=style))
        table.add_row(*row)
    console.print(table)


def count_noun(number: int, noun: str) -> str:
    """Return '1 model' or '3 models'."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _markdown_cell(model: dict, metric: dict) -> str:
    data = model["metrics"].get(metric["key"])
    if data is None:
        return ""
    text = format_estimate(Estimate.from_dict(data))
    return f"**{text}**" if model["name"] in metric["best"] else text


def render_comparison_markdown(comparison: dict, metric_names=SUMMARY_METRICS) -> str:
    """Markdown for a pull-request comment: the summary table (best value in bold), all metrics folded, settings."""
    metrics = _summary_keys(comparison, metric_names)
    compatibility = comparison["compatibility"]
    lines = [
        f"## fdiv compare: {compatibility['suite']}",
        "",
        f"{count_noun(len(comparison['models']), 'model')} from {count_noun(len(comparison['reports']), 'report')}. "
        "Values are estimates with 95% confidence intervals; ↓ lower is better, ↑ higher is better; "
        "**bold** is the best value per metric; (!) marks an unreliable estimate (Pareto k̂ > 0.7 or ESS < 10).",
        "",
        "| model | " + " | ".join(f"{_header(metric)} `{metric['name_with_unit']}`" for metric in metrics) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    for model in comparison["models"]:
        cells = [_markdown_cell(model, metric) for metric in metrics]
        lines.append(f"| {model['name']} | " + " | ".join(cells) + " |")

    models = comparison["models"]
    lines += ["", "<details><summary>All metrics</summary>", "",
              "| metric | " + " | ".join(model["name"] for model in models) + " |",
              "|---|" + "---:|" * len(models)]
    for metric in comparison["metrics"]:
        cells = [_markdown_cell(model, metric) for model in models]
        lines.append(f"| {_header(metric)} `{metric['name_with_unit']}` | " + " | ".join(cells) + " |")
    lines += ["", "</details>"]

    lines += ["", "| report | suite hash | seed | policy samples | base samples | log Z | created |",
              "|---|---|---:|---:|---:|---|---|"]
    for report in comparison["reports"]:
        audit = report["settings"].get("audit", {})
        log_z = format_estimate(Estimate.from_dict(report["log_partition"]))
        lines.append(
            f"| {report['label']} | `{report['suite']['hash']}` | {audit.get('seed', '')} | {audit.get('samples', '')} "
            f"| {audit.get('base_samples', '')} | {log_z} | {report['created']} |"
        )
    notes = []
    for model in comparison["models"]:
        for key, data in model["metrics"].items():
            for note in data.get("notes", []):
                notes.append(f"- {model['name']}, `{key}`: {note}")
    if notes:
        lines += ["", "<details><summary>Notes</summary>", "", *notes, "", "</details>"]
    lines.append("")
    return "\n".join(lines)

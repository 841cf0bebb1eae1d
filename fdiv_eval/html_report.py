"""A self-contained HTML comparison page with embedded plots.

Every plot is a matplotlib PNG embedded as a base64 data URI and the styles
are inline, so the page opens without network access. A short inline script
marks each plot image as rendered once it has decoded and records the plots'
positions in ``#plot-geometry``, so that a headless browser can check them.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from typing import Any, Callable

from fdiv_eval.compare import count_noun
from fdiv_eval.estimates import Estimate, decode_float
from fdiv_eval.report import format_estimate, format_number

logger = logging.getLogger(__name__)

ProgressFactory = Callable[[str, int], Callable[[int], None]]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; }
th { background: #f3f3f3; }
td.number { text-align: right; white-space: nowrap; }
td.best { font-weight: bold; background: #e5f5e0; }
td.unreliable { color: #a15c00; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; }
figcaption { font-size: 0.85em; color: #555; max-width: 420px; }
img.plot { display: block; }
.muted { color: #666; font-size: 0.9em; }
"""

# Marks decoded plots and records their boxes, for automated checks of the page.
_SCRIPT = """
window.addEventListener('load', function () {
  var boxes = [];
  document.querySelectorAll('img.plot').forEach(function (image) {
    var ok = image.complete && image.naturalWidth > 0;
    image.setAttribute('data-rendered', ok ? 'yes' : 'no');
    var box = image.getBoundingClientRect();
    boxes.push({name: image.getAttribute('data-plot'), rendered: ok,
                x: box.left + window.scrollX, y: box.top + window.scrollY, width: box.width, height: box.height});
  });
  document.getElementById('plot-geometry').textContent = JSON.stringify(
    {height: document.documentElement.scrollHeight, width: document.documentElement.scrollWidth, plots: boxes});
});
"""


def _figure_to_uri(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _image(uri: str, name: str, caption: str) -> str:
    return (f'<figure><img class="plot" data-plot="{html.escape(name)}" src="{uri}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _estimate(model: dict, key: str) -> Estimate | None:
    data = model["metrics"].get(key)
    return Estimate.from_dict(data) if data is not None else None


def metric_chart(comparison: dict, metric: dict) -> str | None:
    """Point estimates with 95% CI whiskers, one row per model; None when no model has the metric."""
    import matplotlib.pyplot as plt

    rows = [(model["name"], _estimate(model, metric["key"])) for model in comparison["models"]]
    rows = [(name, estimate) for name, estimate in rows if estimate is not None]
    if not rows:
        return None
    figure, axes = plt.subplots(figsize=(4.2, 0.45 * len(rows) + 1.0))
    for position, (name, estimate) in enumerate(rows):
        color = "#1f4e99"
        if not estimate.reliable:
            color = "#c77c02"
        if name in metric["best"]:
            color = "#2b8a3e"
        if math.isfinite(estimate.value):
            low = estimate.value - estimate.ci_low if math.isfinite(estimate.ci_low) else 0.0
            high = estimate.ci_high - estimate.value if math.isfinite(estimate.ci_high) else 0.0
            axes.errorbar([estimate.value], [position], xerr=[[max(low, 0.0)], [max(high, 0.0)]], fmt="o",
                          color=color, capsize=4)
        else:
            axes.annotate(format_number(estimate.value), (0.98, position), xycoords=("axes fraction", "data"),
                          ha="right", va="center", color=color)
    axes.set_yticks(range(len(rows)), [name for name, _ in rows])
    axes.invert_yaxis()
    unit = f" ({metric['unit']})" if metric["unit"] else ""
    arrow = {"lower": "  ↓ lower is better", "higher": "  ↑ higher is better"}.get(metric["direction"], "")
    axes.set_title(f"{metric['label']}{unit}{arrow}", fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    return _figure_to_uri(figure)


def _scatter_metric(comparison: dict) -> dict | None:
    keys = {metric["key"]: metric for metric in comparison["metrics"]}
    if "constraint_satisfaction" in keys:
        return keys["constraint_satisfaction"]
    for key, metric in keys.items():
        if "reward" in key:
            return metric
    return None


def tradeoff_scatter(comparison: dict) -> str | None:
    """Constraint satisfaction (or reward) against KL(π‖π0) per model, with both CIs."""
    import matplotlib.pyplot as plt

    y_metric = _scatter_metric(comparison)
    if y_metric is None:
        return None
    points = []
    for model in comparison["models"]:
        x, y = _estimate(model, "kl_to_base"), _estimate(model, y_metric["key"])
        if x is not None and y is not None and math.isfinite(x.value) and math.isfinite(y.value):
            points.append((model["name"], x, y))
    if not points:
        return None
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for name, x, y in points:
        axes.errorbar([x.value], [y.value], xerr=[[x.value - x.ci_low], [x.ci_high - x.value]],
                      yerr=[[y.value - y.ci_low], [y.ci_high - y.value]], fmt="o", capsize=3)
        axes.annotate(name, (x.value, y.value), textcoords="offset points", xytext=(6, 6), fontsize=9)
    axes.set_xlabel("KL(π‖π0), nats (drift from the base model)")
    axes.set_ylabel(f"{y_metric['label']} ({y_metric['unit']})" if y_metric["unit"] else y_metric["label"])
    axes.set_title("alignment against drift", fontsize=10)
    axes.grid(alpha=0.3)
    return _figure_to_uri(figure)


_CURVE_PANELS = (
    ("divergence to the target on the training batch (nats for KL and JS)", lambda key: key.endswith("_on_batch")),
    ("constraint satisfaction or reward on the training batch",
     lambda key: key == "train/constraint_satisfaction" or ("reward" in key and "pseudo" not in key)),
    ("KL(π‖π0) on the training batch, nats", lambda key: key == "train/kl_to_base"),
)


def training_curves(comparison: dict) -> list[tuple[str, str]]:
    """Plot one panel each for divergence, constraint or reward, and KL to base, with a line per trained model."""
    import matplotlib.pyplot as plt

    curves = [(model["name"], model["training_curve"]) for model in comparison["models"] if model.get("training_curve")]
    plots = []
    for title, selects in _CURVE_PANELS:
        figure, axes = plt.subplots(figsize=(6, 3.8))
        drawn = 0
        for name, curve in curves:
            for key in curve:
                if key == "step" or not selects(key):
                    continue
                pairs = [(s, v) for s, v in zip(curve["step"], curve[key]) if s is not None and v is not None]
                if not pairs:
                    continue
                label = name if key in ("train/constraint_satisfaction", "train/kl_to_base") else \
                    f"{name}: {key.removeprefix('train/')}"
                axes.plot([s for s, _ in pairs], [v for _, v in pairs], label=label, linewidth=1.2)
                drawn += 1
        if drawn == 0:
            plt.close(figure)
            continue
        axes.set_xlabel("training step")
        axes.set_title(title, fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        plots.append((title, _figure_to_uri(figure)))
    return plots


def _pairwise_value(cell: Any) -> float:
    if isinstance(cell, dict):
        cell = cell.get("value")
    cell = decode_float(cell)
    return float(cell) if isinstance(cell, (int, float)) and not isinstance(cell, bool) else math.nan


def pairwise_matrices(pairwise: Any) -> list[tuple[str, list[str], list[list[float]]]]:
    """Normalize a report's ``pairwise`` data into (title, models, matrix of values) triples.

    Accepts a mapping with ``models`` and ``matrix`` (cells are numbers or
    Estimate objects), a mapping from divergence name to such a mapping, or a
    list of such mappings. Anything else yields no matrix.
    """
    if isinstance(pairwise, list):
        found = []
        for item in pairwise:
            found += pairwise_matrices(item)
        return found
    if not isinstance(pairwise, dict):
        return []
    models = pairwise.get("models")
    matrix = pairwise.get("matrix", pairwise.get("values"))
    if isinstance(models, list) and matrix is None:
        # The audit's own layout: one matrix per divergence under "kl" and "js".
        titles = {"kl": "KL(row‖column), nats", "js": "Jensen–Shannon divergence, nats"}
        found = []
        for key, title in titles.items():
            if isinstance(pairwise.get(key), list):
                found += pairwise_matrices({"models": models, "matrix": pairwise[key], "divergence": title})
        return found
    if isinstance(models, list) and isinstance(matrix, list):
        if len(matrix) != len(models) or any(not isinstance(row, list) or len(row) != len(models) for row in matrix):
            logger.warning("pairwise matrix is not %d×%d; skipping it", len(models), len(models))
            return []
        title = str(pairwise.get("divergence", pairwise.get("name", "pairwise divergence")))
        return [(title, [str(m) for m in models], [[_pairwise_value(cell) for cell in row] for row in matrix])]
    found = []
    for name, value in pairwise.items():
        for title, models, values in pairwise_matrices(value):
            found.append((name if title == "pairwise divergence" else title, models, values))
    return found


def pairwise_heatmap(title: str, models: list[str], values: list[list[float]]) -> str:
    """Heat map of D(row ‖ column) between checkpoints, each cell annotated with its value."""
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.array(values, dtype=np.float64)
    size = 1.0 + 0.8 * len(models)
    figure, axes = plt.subplots(figsize=(size + 1.5, size))
    shown = np.where(np.isfinite(matrix), matrix, np.nan)
    image = axes.imshow(shown, cmap="viridis")
    figure.colorbar(image, ax=axes, shrink=0.8)
    axes.set_xticks(range(len(models)), models, rotation=45, ha="right")
    axes.set_yticks(range(len(models)), models)
    finite = matrix[np.isfinite(matrix)]
    middle = float(np.median(finite)) if finite.size else 0.0
    for row in range(len(models)):
        for column in range(len(models)):
            value = matrix[row, column]
            color = "white" if not math.isfinite(value) or value < middle else "black"
            axes.text(column, row, format_number(value), ha="center", va="center", fontsize=8, color=color)
    axes.set_title(f"{title}: row ‖ column", fontsize=10)
    return _figure_to_uri(figure)


def _table(headers: list[str], rows: list[list[str]], classes: list[list[str]] | None = None) -> str:
    parts = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    for index, row in enumerate(rows):
        cells = []
        for column, cell in enumerate(row):
            css = classes[index][column] if classes else ""
            cells.append(f'<td class="{css}">{cell}</td>' if css else f"<td>{cell}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return "".join(parts)


def _metrics_table(comparison: dict) -> str:
    models = comparison["models"]
    rows, classes = [], []
    for metric in comparison["metrics"]:
        arrow = {"lower": " ↓", "higher": " ↑"}.get(metric["direction"], "")
        row = [f"{html.escape(metric['label'])}{arrow}<br><code>{html.escape(metric['name_with_unit'])}</code>"]
        css = [""]
        for model in models:
            estimate = _estimate(model, metric["key"])
            if estimate is None:
                row.append("")
                css.append("number")
                continue
            row.append(html.escape(format_estimate(estimate)))
            names = ["number"]
            if model["name"] in metric["best"]:
                names.append("best")
            if not estimate.reliable:
                names.append("unreliable")
            css.append(" ".join(names))
        rows.append(row)
        classes.append(css)
    return _table(["metric"] + [model["name"] for model in models], rows, classes)


def _settings_section(comparison: dict) -> str:
    rows = []
    for report in comparison["reports"]:
        settings = report["settings"]
        audit = settings.get("audit", {})
        versions = settings.get("versions") or {}
        version_text = ", ".join(f"{k} {v}" for k, v in versions.items()) or report.get("generator") or ""
        rows.append([html.escape(str(value)) for value in (
            report["label"], report["suite"]["name"], report["suite"]["hash"], audit.get("seed", ""),
            audit.get("samples", ""), audit.get("base_samples", ""), settings.get("max_new_tokens", ""),
            format_estimate(Estimate.from_dict(report["log_partition"])), report.get("created", ""), version_text,
        )])
    table = _table(["report", "suite", "suite hash", "seed", "policy samples", "base samples", "max new tokens",
                    "log Z", "created", "versions"], rows)
    decoding = ", ".join(f"{key} = {value}" for key, value in comparison["decoding"].items())
    compatibility = comparison["compatibility"]
    conventions = "; ".join(f"{key}: {value}" for key, value in compatibility["conventions"].items())
    target = html.escape(json.dumps(comparison.get("target"), ensure_ascii=False))
    return (f"{table}<p>Decoding of every audit sample: {html.escape(decoding)}.</p>"
            f"<p>Base model <code>{html.escape(str(compatibility['base_model']))}</code>, target "
            f"<code>{target}</code>.</p><p>Conventions: {html.escape(conventions)}.</p>")


def _samples_section(comparison: dict) -> str:
    parts = []
    for model in comparison["models"]:
        if not model["samples"]:
            continue
        rows = []
        for sample in model["samples"]:
            satisfied = {True: "yes", False: "no", None: ""}[sample.get("constraint")]
            log_prob = format_number(sample["log_prob"]) if sample.get("log_prob") is not None else ""
            rows.append([html.escape(sample["text"]), satisfied, log_prob, html.escape(str(sample.get("length", "")))])
        parts.append(f"<h3>{html.escape(model['name'])}</h3>"
                     + _table(["text", "b(x)", "log π(x), nats", "tokens"], rows))
    return "".join(parts) or "<p class='muted'>No samples files were found beside the reports.</p>"


def render_html(comparison: dict, progress: ProgressFactory | None = None) -> str:
    """Render the comparison as one HTML page with embedded PNG plots and no external resources."""
    import matplotlib

    matplotlib.use("Agg")
    plots_total = len(comparison["metrics"]) + 5
    advance = progress("rendering plots", plots_total) if progress else (lambda count: None)

    charts = []
    for metric in comparison["metrics"]:
        uri = metric_chart(comparison, metric)
        if uri:
            charts.append(_image(uri, f"metric:{metric['key']}", f"{metric['description']}; whiskers: 95% CI"))
        advance(1)
    scatter = tradeoff_scatter(comparison)
    advance(1)
    curves = training_curves(comparison)
    advance(1)
    heatmaps = []
    for report in comparison["reports"]:
        for title, models, values in pairwise_matrices(report.get("pairwise")):
            heatmaps.append(_image(pairwise_heatmap(title, models, values), f"pairwise:{report['label']}:{title}",
                                   f"{title} between checkpoints ({report['label']}), row model against column model"))
    advance(3)

    suite = html.escape(comparison["compatibility"]["suite"])
    sections = [
        f"<h1>fdiv-eval comparison: {suite}</h1>",
        f"<p class='muted'>{html.escape(comparison['generator'])}; {count_noun(len(comparison['models']), 'model')} "
        f"from {count_noun(len(comparison['reports']), 'report')}. Values are estimates with 95% confidence intervals; ↓ lower is "
        "better, ↑ higher is better; the best value per metric is bold on green; (!) and orange mark an "
        "unreliable estimate (Pareto k̂ &gt; 0.7 or ESS &lt; 10).</p>",
        "<h2>Metrics</h2>", _metrics_table(comparison),
        "<h2>Metric charts</h2>", f"<div class='grid'>{''.join(charts)}</div>",
        "<h2>Alignment against drift</h2>",
        _image(scatter, "scatter", "each model's constraint satisfaction or reward against KL(π‖π0), with 95% CIs")
        if scatter else "<p class='muted'>No model has both KL(π‖π0) and constraint satisfaction or reward.</p>",
        "<h2>Training curves</h2>",
        f"<div class='grid'>{''.join(_image(uri, f'curve:{title}', title) for title, uri in curves)}</div>"
        if curves else "<p class='muted'>No training log (train_log.jsonl) was found; pass --runs DIR.</p>",
        "<h2>Pairwise divergences</h2>",
        f"<div class='grid'>{''.join(heatmaps)}</div>" if heatmaps
        else "<p class='muted'>The reports carry no pairwise divergence matrix.</p>",
        "<h2>Sample texts</h2>", _samples_section(comparison),
        "<h2>Settings</h2>", _settings_section(comparison),
        "<pre id='plot-geometry' hidden></pre>",
    ]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>fdiv-eval comparison: {suite}</title><style>{_STYLE}</style>"
            f"<script>{_SCRIPT}</script></head><body>{''.join(sections)}</body></html>\n")

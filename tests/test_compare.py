"""fdiv compare: compatibility checks, best-value marks, and golden Markdown, JSON and terminal renderings."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from fdiv_eval.cli import main
from fdiv_eval.compare import build_comparison, comparison_json, print_comparison, render_comparison_markdown
from fdiv_eval.conventions import unit_name
from fdiv_eval.errors import InvalidInputError
from fdiv_eval.estimates import Estimate, normal_estimate
from fdiv_eval.report import build_report, load_report, write_json

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("FDIV_UPDATE_GOLDEN") == "1"
TARGET = {"type": "word_list", "words": ["she", "her"], "epsilon": 0.001, "formula": "P(x) = pi0(x) * max(b(x), epsilon)"}


def _model(name: str, forward_kl: float, satisfaction: float, kl_to_base: float, pareto_k: float | None = None,
           reverse_kl: float | None = None) -> dict:
    metrics = {
        "forward_kl": Estimate(forward_kl, 0.1, forward_kl - 0.196, forward_kl + 0.196, 256, "mean+clt",
                               effective_sample_size=80.0, pareto_k=pareto_k),
        "reverse_kl": normal_estimate(reverse_kl if reverse_kl is not None else forward_kl + 1.0, 0.05, 256,
                                      "mean+clt"),
        "js": normal_estimate(forward_kl / 4, 0.01, 256, "mean+clt"),
        "constraint_satisfaction": Estimate(satisfaction, 0.02, satisfaction - 0.04, satisfaction + 0.04, 256,
                                            "wilson"),
        "kl_to_base": normal_estimate(kl_to_base, 0.03, 256, "mean+clt"),
    }
    return {"name": name, "model": f"runs/demo/{name}/final", "method": name, "metrics": metrics}


def _write_report(folder: Path, models: list[dict], target: dict = TARGET, seed: int = 1, max_new_tokens: int = 20,
                  suite_name: str = "demo") -> Path:
    log_z = normal_estimate(-1.5, 0.05, 1024, "acceptance-rate+wilson")
    settings = {"max_new_tokens": max_new_tokens, "audit": {"samples": 256, "base_samples": 1024, "seed": seed},
                "base_model": "embedded:austen", "runs_dir": "runs/demo"}
    report = build_report(suite_name, "0123456789abcdef", target, log_z, models, settings, elapsed_seconds=1.0)
    report["created"] = "2026-01-01T00:00:00+00:00"
    write_json(report, folder / "report.json")
    return folder


@pytest.fixture
def two_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = _write_report(Path("first"), [_model("base", 2.0, 0.2, 0.0), _model("gdc", 1.0, 0.6, 2.5)])
    second = _write_report(Path("second"), [_model("rlhf", 1.5, 0.7, 2.0, pareto_k=0.9, reverse_kl=math.inf)],
                           seed=2)
    return [first, second]


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} differs; rerun with FDIV_UPDATE_GOLDEN=1 if intended"


def test_best_values_per_metric(two_reports):
    comparison = build_comparison(two_reports)
    best = {metric["key"]: metric["best"] for metric in comparison["metrics"]}
    assert best["js"] == ["gdc"]
    assert best["constraint_satisfaction"] == ["rlhf"]
    # rlhf's forward KL is flagged unreliable (k̂ = 0.9), so it cannot be best; gdc's 1.0 is.
    assert best["forward_kl"] == ["gdc"]
    # An infinite value is never best; direction none has no best.
    assert best["reverse_kl"] == ["gdc"]
    assert best["kl_to_base"] == []


def test_markdown_golden(two_reports):
    _golden("compare.md", render_comparison_markdown(build_comparison(two_reports)))


def test_json_golden(two_reports):
    text = comparison_json(build_comparison(two_reports))
    _golden("compare.json", text)
    document = json.loads(text)
    assert [model["name"] for model in document["models"]] == ["base", "gdc", "rlhf"]
    assert document["models"][2]["metrics"]["reverse_kl"]["value"] == "inf"


def test_terminal_table_golden(two_reports):
    from rich.console import Console

    console = Console(record=True, width=160, color_system=None, force_terminal=False)
    print_comparison(build_comparison(two_reports), console)
    _golden("compare.txt", console.export_text())


def test_terminal_table_styles_best_cell(two_reports):
    from rich.console import Console

    console = Console(record=True, width=160, color_system="standard", force_terminal=True)
    print_comparison(build_comparison(two_reports), console)
    ansi = console.export_text(styles=True)
    # Bold green (1;32) wraps gdc's best JS value, 0.25.
    assert re.search(r"\x1b\[1;32m *0\.25\x1b", ansi)
    assert "(!)" in ansi


def test_duplicate_model_names_get_report_label(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = _write_report(Path("run-a"), [_model("gdc", 1.0, 0.6, 2.5)])
    second = _write_report(Path("run-b"), [_model("gdc", 1.1, 0.6, 2.5)])
    names = [model["name"] for model in build_comparison([first, second])["models"]]
    assert names == ["gdc@run-a", "gdc@run-b"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"target": {**TARGET, "words": ["he"]}}, "compatibility.target.words"),
        ({"max_new_tokens": 32}, "compatibility.max_new_tokens"),
        ({"suite_name": "other"}, "compatibility.suite"),
    ],
)
def test_incompatible_reports_are_rejected(tmp_path, changes, field):
    first = _write_report(tmp_path / "a", [_model("gdc", 1.0, 0.6, 2.5)])
    second = _write_report(tmp_path / "b", [_model("gdc", 1.0, 0.6, 2.5)], **changes)
    with pytest.raises(InvalidInputError, match=field.replace(".", r"\.")):
        build_comparison([first, second])


def test_differing_conventions_are_rejected(tmp_path):
    first = _write_report(tmp_path / "a", [_model("gdc", 1.0, 0.6, 2.5)])
    second = _write_report(tmp_path / "b", [_model("gdc", 1.0, 0.6, 2.5)])
    report = json.loads((second / "report.json").read_text())
    report["compatibility"]["conventions"]["js"] = "distance, square root of the divergence"
    report["compatibility"]["metric_units"]["js"] = "bits"
    (second / "report.json").write_text(json.dumps(report))
    with pytest.raises(InvalidInputError, match=r"compatibility\.conventions\.js differs"):
        build_comparison([first, second])


def test_schema_1_report_still_loads(tmp_path):
    folder = _write_report(tmp_path / "old", [_model("gdc", 1.0, 0.6, 2.5)])
    report = json.loads((folder / "report.json").read_text())
    report["schema_version"] = 1
    del report["compatibility"]
    (folder / "report.json").write_text(json.dumps(report))
    loaded = load_report(folder)
    assert loaded["compatibility"]["target"] == TARGET
    assert loaded["compatibility"]["metric_units"]["forward_kl"] == "nats"


def test_unit_names_carry_convention():
    assert unit_name("js") == "js_divergence_nats"
    assert unit_name("tv") == "tv"
    assert unit_name("hellinger") == "hellinger_squared"
    assert unit_name("forward_kl") == "forward_kl_nats"
    assert unit_name("distinct_2") == "distinct_2_corpus"
    assert unit_name("self_bleu") == "self_bleu"  # a fraction in [0, 1], like constraint_satisfaction
    assert unit_name("mean_length") == "mean_length_tokens"
    assert unit_name("constraint_satisfaction") == "constraint_satisfaction"


def test_report_metrics_list_unit_names(two_reports):
    report = load_report(two_reports[0])
    assert report["metrics"]["js"]["name_with_unit"] == "js_divergence_nats"


def test_training_curves_from_runs_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _write_report(Path("report"), [_model("gdc", 1.0, 0.6, 2.5)])
    log = Path("elsewhere") / "gdc" / "train_log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text('{"step": 1, "train/forward_kl_on_batch": 2.0, "train/kl_to_base": 0.0}\n'
                   '{"step": 2, "train/forward_kl_on_batch": "inf", "train/kl_to_base": 0.5}\n')
    comparison = build_comparison([folder], runs_dirs=[Path("elsewhere")])
    curve = comparison["models"][0]["training_curve"]
    assert curve == {"step": [1, 2], "train/forward_kl_on_batch": [2.0, None], "train/kl_to_base": [0.0, 0.5]}


def test_compare_cli_writes_all_outputs(two_reports, capsys):
    arguments = ["--no-progress", "compare", *map(str, two_reports), "--markdown", "out/c.md", "--json", "out/c.json",
                 "--html", "out/c.html"]
    assert main(arguments) == 0
    output = capsys.readouterr().out
    assert "gdc" in output
    assert Path("out/c.md").read_text().startswith("## fdiv compare: demo")
    assert json.loads(Path("out/c.json").read_text())["comparison_version"] == 1
    assert Path("out/c.html").read_text().count('class="plot"') >= 6


def test_compare_cli_rejects_incompatible(tmp_path, capsys):
    first = _write_report(tmp_path / "a", [_model("gdc", 1.0, 0.6, 2.5)])
    second = _write_report(tmp_path / "b", [_model("gdc", 1.0, 0.6, 2.5)], max_new_tokens=32)
    assert main(["compare", str(first), str(second)]) == 2
    error = capsys.readouterr().err
    assert "compatibility.max_new_tokens differs (20 vs 32)" in " ".join(error.split())


def test_compare_cli_missing_runs_folder(two_reports, capsys):
    assert main(["compare", str(two_reports[0]), "--runs", "nowhere"]) == 2
    assert "--runs folder 'nowhere' not found" in capsys.readouterr().err


def test_pairwise_matrix_formats():
    from fdiv_eval.html_report import pairwise_matrices

    estimate = {"value": 0.5, "standard_error": 0.1}
    plain = {"models": ["a", "b"], "matrix": [[0, 0.5], ["inf", 0]], "divergence": "js"}
    assert pairwise_matrices(plain) == [("js", ["a", "b"], [[0.0, 0.5], [math.inf, 0.0]])]
    nested = {"tv": {"models": ["a", "b"], "matrix": [[0, estimate], [estimate, 0]]}}
    assert pairwise_matrices(nested) == [("tv", ["a", "b"], [[0.0, 0.5], [0.5, 0.0]])]
    assert len(pairwise_matrices([plain, nested])) == 2
    assert pairwise_matrices({"models": ["a", "b"], "matrix": [[0, 1]]}) == []
    assert pairwise_matrices(None) == []
    assert pairwise_matrices("js") == []


def test_html_without_pairwise_or_logs(two_reports):
    from fdiv_eval.html_report import render_html

    page = render_html(build_comparison(two_reports))
    assert "The reports carry no pairwise divergence matrix." in page
    assert "No training log (train_log.jsonl) was found" in page
    assert 'data-plot="pairwise:' not in page
    assert page.count('data-plot="metric:') == 5
    assert 'data-plot="scatter"' in page


def test_compare_cli_output_folder(two_reports, capsys):
    assert main(["--no-progress", "compare", *map(str, two_reports), "--output", "all"]) == 0
    for name in ("comparison.md", "comparison.json", "comparison.html"):
        assert Path("all", name).is_file(), name

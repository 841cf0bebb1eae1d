"""The HTML comparison page in a real headless Chromium: every plot renders, no console output, no network."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fdiv_eval.compare import build_comparison
from fdiv_eval.html_report import render_html

REPOSITORY = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
    # Every host name fails to resolve, so any network request would fail.
    "--host-resolver-rules=MAP * ~NOTFOUND",
]

WIDTH = 1400

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the Debian chromium package (installed by .ci/run)")


def _chromium(page: Path, profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *arguments, page.as_uri()],
        capture_output=True, text=True, check=False,
    )


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def _geometry(dom: str) -> dict:
    match = re.search(r'<pre id="plot-geometry"[^>]*>(.*?)</pre>', dom, re.DOTALL)
    assert match, "the page did not record its plot geometry"
    import html

    return json.loads(html.unescape(match.group(1)))


def _write_training_logs(runs: Path, methods: list[str]) -> None:
    for index, method in enumerate(methods):
        folder = runs / method
        folder.mkdir(parents=True)
        with (folder / "train_log.jsonl").open("w") as stream:
            for step in range(1, 21):
                record = {"step": step, "train/constraint_satisfaction": 0.05 + 0.02 * step,
                          f"train/{method}_on_batch": 3.0 / (step + index), "train/kl_to_base": 0.1 * step}
                stream.write(json.dumps(record) + "\n")


@pytest.fixture
def comparison_page(tmp_path) -> Path:
    """The quickstart report with training logs and a pairwise matrix, rendered to HTML."""
    report_folder = tmp_path / "quickstart"
    shutil.copytree(REPOSITORY / "reports" / "quickstart", report_folder)
    report = json.loads((report_folder / "report.json").read_text())
    names = [model["name"] for model in report["models"]]
    rng = np.random.default_rng(0)
    matrix = rng.uniform(0.1, 2.0, size=(len(names), len(names)))
    np.fill_diagonal(matrix, 0.0)
    report["pairwise"] = {"js": {"models": names, "matrix": matrix.tolist()}}
    (report_folder / "report.json").write_text(json.dumps(report))
    _write_training_logs(tmp_path / "runs", ["rlhf", "gdc", "js", "tv"])

    comparison = build_comparison([report_folder], runs_dirs=[tmp_path / "runs"])
    page = tmp_path / "comparison.html"
    page.write_text(render_html(comparison), encoding="utf-8")
    return page


def test_page_has_no_external_resources(comparison_page):
    text = comparison_page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "@import" not in text
    assert "url(http" not in text


def test_every_plot_renders_in_chromium(comparison_page, tmp_path):
    from PIL import Image

    # The same window width in both passes gives the same layout, so the
    # boxes recorded in the first pass locate the plots in the screenshot.
    dumped = _chromium(comparison_page, tmp_path / "profile-dom", "--dump-dom", f"--window-size={WIDTH},1000",
                       "--virtual-time-budget=5000")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert _console_lines(dumped.stderr) == []
    geometry = _geometry(dumped.stdout)
    names = [plot["name"] for plot in geometry["plots"]]
    # One chart per metric that the quickstart report carries.
    report = json.loads((REPOSITORY / "reports" / "quickstart" / "report.json").read_text())
    reported = {name for model in report["models"] for name in model["metrics"]}
    assert sum(name.startswith("metric:") for name in names) == len(reported)
    assert "scatter" in names
    assert sum(name.startswith("curve:") for name in names) == 3
    assert any(name.startswith("pairwise:") for name in names)
    assert all(plot["rendered"] for plot in geometry["plots"])

    screenshot = tmp_path / "page.png"
    shot = _chromium(comparison_page, tmp_path / "profile-shot", f"--screenshot={screenshot}",
                     f"--window-size={WIDTH},{int(geometry['height']) + 40}", "--virtual-time-budget=5000")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert _console_lines(shot.stderr) == []
    image = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    for plot in geometry["plots"]:
        left, top = int(plot["x"]), int(plot["y"])
        assert left + plot["width"] <= WIDTH, plot["name"]
        region = image[top : top + int(plot["height"]), left : left + int(plot["width"])]
        assert region.size > 0, plot["name"]
        # A blank (all-white or uniform) box has no contrast; a chart has axes, text and markers.
        assert region.std() > 10.0, plot["name"]
        assert (region < 128).mean() > 0.002, plot["name"]


def test_console_errors_are_detected(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>console.error('broken page'); missingFunction();</script></body></html>")
    dumped = _chromium(page, tmp_path / "profile", "--dump-dom")
    lines = _console_lines(dumped.stderr)
    assert any("broken page" in line for line in lines)
    assert any("missingFunction" in line for line in lines)

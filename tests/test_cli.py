"""The fdiv command line end to end, and its answers to bad input."""

import json
import math
import subprocess
import sys

import pytest
import yaml

from fdiv_eval.cli import main
from fdiv_eval.report import SCHEMA_VERSION


def _edit_suite(path, **changes):
    """Rewrite a suite file with top-level or dotted-key changes."""
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        node = data
        parts = key.split("__")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    path.write_text(yaml.safe_dump(data))
    return path


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err
    assert len(lines) >= 1
    return " ".join(lines)


@pytest.mark.slow
def test_run_trains_audits_and_reports(tiny_suite, tmp_path, capsys):
    assert main(["--no-progress", "run", str(tiny_suite)]) == 0
    output = capsys.readouterr().out
    assert "wrote" in output

    report = json.loads((tmp_path / "reports" / "report.json").read_text())
    assert report["schema_version"] == SCHEMA_VERSION
    assert [m["name"] for m in report["models"]] == ["base", "rlhf", "gdc", "js", "tv"]
    for model in report["models"]:
        for name in ("forward_kl", "reverse_kl", "js", "tv", "constraint_satisfaction", "kl_to_base",
                     "distinct_1", "distinct_2", "distinct_3", "self_bleu", "mean_length"):
            estimate = model["metrics"][name]
            for field in ("value", "standard_error", "ci_low", "ci_high", "n", "method"):
                assert field in estimate, (model["name"], name, field)
        assert model["metrics"]["forward_kl"]["effective_sample_size"] is not None
    base_kl = report["models"][0]["metrics"]["kl_to_base"]
    assert base_kl["value"] == 0.0
    assert report["log_partition"]["n"] == 128

    for name in ("base", "rlhf", "gdc", "js", "tv"):
        assert (tmp_path / "runs" / name / "final" / "model.safetensors").is_file() or name == "base"
    assert (tmp_path / "reports" / "report.md").read_text().startswith("# fdiv-eval report: tiny")

    from datasets import Dataset

    samples = Dataset.from_parquet(str(tmp_path / "reports" / "samples" / "rlhf.parquet"))
    assert len(samples) == 64
    assert {"text", "log_prob", "log_prob_base", "constraint", "log_potential"} <= set(samples.column_names)

    # A second run has nothing left to do: no steps to train, and the report
    # already covers this suite content and these weights, so the audit is skipped.
    written = (tmp_path / "reports" / "report.json").stat().st_mtime_ns
    assert main(["--no-progress", "run", str(tiny_suite)]) == 0
    output = capsys.readouterr().out
    assert "0 steps" in output
    assert "is up to date for this suite content and these checkpoints, so the audit was skipped" in output
    assert (tmp_path / "reports" / "report.json").stat().st_mtime_ns == written

    # --force audits again; so does a run after a checkpoint's weights changed.
    assert main(["--no-progress", "run", str(tiny_suite), "--force"]) == 0
    assert "audit was skipped" not in capsys.readouterr().out
    weights = tmp_path / "runs" / "js" / "final" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert main(["--no-progress", "run", str(tiny_suite)]) == 0
    assert "audit was skipped" not in capsys.readouterr().out

    assert main(["--no-progress", "compare", str(tmp_path / "reports")]) == 0
    assert "rlhf" in capsys.readouterr().out


def test_train_then_audit_separately(tiny_suite, tmp_path, capsys):
    _edit_suite(tiny_suite, train__methods=["gdc"], train__steps=2)
    assert main(["--no-progress", "train", str(tiny_suite)]) == 0
    assert main(["--no-progress", "audit", str(tiny_suite), "--no-base"]) == 0
    report = json.loads((tmp_path / "reports" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["gdc"]


def test_train_accepts_any_divergence(tiny_suite, tmp_path, capsys):
    arguments = ["--no-progress", "train", str(tiny_suite), "--divergence", "alpha", "--alpha", "0.5",
                 "--steps", "1", "--output", str(tmp_path / "alpha-run")]
    assert main(arguments) == 0
    assert (tmp_path / "alpha-run" / "alpha" / "final" / "config.json").is_file()


def test_unknown_method_in_suite(tiny_suite, capsys):
    _edit_suite(tiny_suite, train__methods=["rlhf", "ppo"])
    assert main(["run", str(tiny_suite)]) == 2
    assert "unknown divergence or method 'ppo'" in _error_line(capsys)


def test_unknown_divergence_option(tiny_suite, capsys):
    assert main(["train", str(tiny_suite), "--divergence", "wasserstein"]) == 2
    assert "unknown divergence or method 'wasserstein'" in _error_line(capsys)


def test_missing_suite_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml' not found" in _error_line(capsys)


def test_malformed_suite_file(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\ntarget: [unclosed\n")
    assert main(["run", str(path)]) == 2
    assert "is not valid YAML at line" in _error_line(capsys)


def test_unknown_suite_field(tiny_suite, capsys):
    _edit_suite(tiny_suite, train__learning_rat=0.1)
    assert main(["run", str(tiny_suite)]) == 2
    assert "unknown suite field 'train.learning_rat'" in _error_line(capsys)


def test_wrongly_typed_suite_field(tiny_suite, capsys):
    _edit_suite(tiny_suite, audit__samples="many")
    assert main(["run", str(tiny_suite)]) == 2
    assert "suite field 'audit.samples' must be an integer, got 'many'" in _error_line(capsys)


def test_missing_checkpoint(tiny_suite, tmp_path, capsys):
    assert main(["audit", str(tiny_suite), "--model", f"ghost={tmp_path / 'ghost'}"]) == 2
    assert "not found: expected a folder with config.json" in _error_line(capsys)


def test_audit_before_training(tiny_suite, capsys):
    assert main(["audit", str(tiny_suite)]) == 2
    assert "run `fdiv train" in _error_line(capsys)


def test_words_that_no_base_sample_contains(tiny_suite, capsys):
    _edit_suite(tiny_suite, target__words=["zyzzyva"])
    assert main(["--no-progress", "audit", str(tiny_suite), "--model", "embedded:austen", "--no-base"]) == 2
    message = _error_line(capsys)
    assert "log Z cannot be estimated" in message
    assert "raise audit.base_samples" in message


def test_words_that_no_base_sample_contains_when_training(tiny_suite, capsys):
    _edit_suite(tiny_suite, target__words=["zyzzyva"], train__methods=["gdc"])
    assert main(["--no-progress", "train", str(tiny_suite)]) == 2
    assert "log Z cannot be estimated" in _error_line(capsys)


def test_reverse_kl_with_hard_constraint(tiny_suite, capsys):
    _edit_suite(tiny_suite, target__epsilon=0.0)
    assert main(["run", str(tiny_suite)]) == 2
    message = _error_line(capsys)
    assert "method 'rlhf' minimizes reverse_kl" in message
    assert "target.epsilon" in message


def test_console_script_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fdiv_eval.cli", "run", str(tmp_path / "none.yaml")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "not found" in result.stderr


def test_help_states_units(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "nats" in capsys.readouterr().out


def test_keep_checkpoints_prunes_old_steps(tiny_suite, tmp_path, capsys):
    from fdiv_eval.suite import load_suite

    text = tiny_suite.read_text()
    before = load_suite(str(tiny_suite)).content_hash()
    tiny_suite.write_text(text.replace("  checkpoint_every: 2\n", "  checkpoint_every: 1\n  keep_checkpoints: 2\n"))
    changed = load_suite(str(tiny_suite))
    assert changed.train.keep_checkpoints == 2
    # Retention changes no result, so only checkpoint_every moved the hash.
    tiny_suite.write_text(text.replace("  checkpoint_every: 2\n", "  checkpoint_every: 1\n"))
    assert load_suite(str(tiny_suite)).content_hash() == changed.content_hash() != before
    tiny_suite.write_text(text.replace("  checkpoint_every: 2\n", "  checkpoint_every: 1\n  keep_checkpoints: 2\n"))

    assert main(["--no-progress", "train", str(tiny_suite), "--method", "js", "--steps", "6"]) == 0
    run = tmp_path / "runs" / "js"
    assert sorted(path.name for path in run.glob("step-*")) == ["step-000004", "step-000005"]
    assert (run / "final" / "model.safetensors").is_file()

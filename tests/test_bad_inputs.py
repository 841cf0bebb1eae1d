"""Table of malformed inputs: each gets one error line naming the value, exit 2, and no output left behind."""

import json

import pytest
import torch
import yaml

from conftest import TINY_SUITE, save_toy_checkpoint
from fdiv_eval.cli import main


def _suite_data(tmp_path) -> dict:
    return yaml.safe_load(TINY_SUITE.format(runs=tmp_path / "runs", reports=tmp_path / "reports"))


def _set(data: dict, dotted: str, value):
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[part]
    if value is _DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value


_DELETE = object()

# (case id, dotted field, new value, expected text in the message)
SUITE_FIELD_CASES = [
    ("name missing", "name", _DELETE, "missing suite field 'name'"),
    ("name with slash", "name", "a/b", "must be a non-empty name without '/'"),
    ("unknown top-level key", "seeds", 3, "unknown suite field 'seeds'"),
    ("unknown nested key", "audit.sample", 10, "unknown suite field 'audit.sample'"),
    ("horizon not a number", "max_new_tokens", "long", "'max_new_tokens' must be an integer, got 'long'"),
    ("horizon zero", "max_new_tokens", 0, "'max_new_tokens' must be between 1 and 1024, got 0"),
    ("horizon too long", "max_new_tokens", 5000, "must be between 1 and 1024, got 5000"),
    ("target as list", "target", ["a"], "suite field 'target' must be a mapping"),
    ("unknown target type", "target.type", "regex", "unknown target type 'regex'"),
    ("empty word list", "target.words", [], "'target.words' must list at least one word"),
    ("words as string", "target.words", "she", "suite field 'target.words' must be a list, got 'she'"),
    ("word not a string", "target.words", ["she", 3], "suite field 'target.words[1]' must be a string, got 3"),
    ("negative epsilon", "target.epsilon", -0.1, "'target.epsilon' must lie in [0, 1), got -0.1"),
    ("epsilon one", "target.epsilon", 1.0, "'target.epsilon' must lie in [0, 1), got 1.0"),
    ("epsilon text", "target.epsilon", "tiny", "'target.epsilon' must be a number, got 'tiny'"),
    ("no methods", "train.methods", [], "'train.methods' must list at least one method"),
    ("duplicate method", "train.methods", ["js", "js"], "lists a method twice"),
    ("unknown method", "train.methods", ["dpo"], "unknown divergence or method 'dpo'"),
    ("zero steps", "train.steps", 0, "'train.steps' must be at least 1, got 0"),
    ("fractional steps", "train.steps", 1.5, "'train.steps' must be an integer, got 1.5"),
    ("batch of one", "train.batch_size", 1, "'train.batch_size' must be at least 2, got 1"),
    ("negative learning rate", "train.learning_rate", -0.1, "'train.learning_rate' must be positive"),
    ("unknown optimizer", "train.optimizer", "adam", "unknown optimizer 'adam'"),
    ("unknown baseline", "train.baseline", "median", "unknown baseline 'median'"),
    ("zero clipping", "train.max_grad_norm", 0, "'train.max_grad_norm' must be positive"),
    ("zero checkpoint interval", "train.checkpoint_every", 0, "'train.checkpoint_every' must be at least 1"),
    ("negative checkpoints kept", "train.keep_checkpoints", -1, "'train.keep_checkpoints' must be 0 (keep all) or more"),
    ("alpha method without alpha", "train.methods", ["alpha"], "needs a value for alpha"),
    ("negative audit samples", "audit.samples", -5, "'audit.samples' must be at least 2, got -5"),
    ("one base sample", "audit.base_samples", 1, "'audit.base_samples' must be at least 2, got 1"),
    ("zero audit batch", "audit.batch_size", 0, "'audit.batch_size' must be at least 1, got 0"),
    ("one self-BLEU sample", "audit.self_bleu_samples", 1, "'audit.self_bleu_samples' must be at least 2"),
    ("few bootstrap resamples", "audit.bootstrap_resamples", 5, "'audit.bootstrap_resamples' must be at least 10"),
    ("alpha metric at endpoint", "audit.alphas", [1.0], "alpha must be a finite number other than 0 and 1"),
    ("zero exact limit", "audit.exact_limit", 0, "'audit.exact_limit' must be at least 1, got 0"),
    ("flag not boolean", "audit.pairwise", "yes", "'audit.pairwise' must be true or false, got 'yes'"),
    ("hard constraint with rlhf", "target.epsilon", 0.0, "method 'rlhf' minimizes reverse_kl"),
    ("missing base model", "base_model", "./no-such-model", "model './no-such-model' not found"),
]


def _assert_usage_error(capsys, tmp_path, expected: str) -> None:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("case, field, value, expected", SUITE_FIELD_CASES, ids=[c[0] for c in SUITE_FIELD_CASES])
def test_bad_suite_field(tmp_path, capsys, case, field, value, expected):
    data = _suite_data(tmp_path)
    _set(data, field, value)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["--no-progress", "run", str(path)]) == 2
    _assert_usage_error(capsys, tmp_path, expected)


def test_suite_not_a_mapping(tmp_path, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text("- just\n- a list\n")
    assert main(["run", str(path)]) == 2
    _assert_usage_error(capsys, tmp_path, "must be a YAML mapping at the top level, got list")


def test_suite_path_is_folder(tmp_path, capsys):
    assert main(["run", str(tmp_path)]) == 2
    _assert_usage_error(capsys, tmp_path, "not found; pass the path of a YAML suite")


def test_checkpoint_with_other_tokenizer(tiny_suite, tmp_path, capsys):
    toy = save_toy_checkpoint(tmp_path / "toy")
    assert main(["--no-progress", "audit", str(tiny_suite), "--model", f"toy={toy}"]) == 2
    _assert_usage_error(capsys, tmp_path, "has another tokenizer than the base model (vocabulary 4 vs 512)")


def test_model_argument_without_name(tiny_suite, tmp_path, capsys):
    assert main(["audit", str(tiny_suite), "--model", "=some/path"]) == 2
    _assert_usage_error(capsys, tmp_path, "--model expects NAME=PATH or PATH, got '=some/path'")


def test_duplicate_model_names(tiny_suite, tmp_path, capsys):
    arguments = ["audit", str(tiny_suite), "--model", "embedded:austen", "--model", "embedded:austen"]
    assert main(arguments) == 2
    _assert_usage_error(capsys, tmp_path, "model names must be unique")


def test_audit_sample_count_option(tiny_suite, tmp_path, capsys):
    assert main(["audit", str(tiny_suite), "--samples", "1", "--model", "embedded:austen"]) == 2
    _assert_usage_error(capsys, tmp_path, "--samples must be at least 2, got 1")


def test_audit_exact_limit_option(tiny_suite, tmp_path, capsys):
    assert main(["audit", str(tiny_suite), "--exact-limit", "0", "--model", "embedded:austen"]) == 2
    _assert_usage_error(capsys, tmp_path, "--exact-limit must be at least 1, got 0")


def test_train_zero_steps_option(tiny_suite, tmp_path, capsys):
    assert main(["--no-progress", "train", str(tiny_suite), "--method", "js", "--steps", "0"]) == 2
    _assert_usage_error(capsys, tmp_path, "--steps must be at least 1, got 0")


def test_train_alpha_without_value(tiny_suite, tmp_path, capsys):
    assert main(["train", str(tiny_suite), "--divergence", "alpha"]) == 2
    _assert_usage_error(capsys, tmp_path, "divergence 'alpha' needs a value for alpha")


def test_compare_file_that_is_not_json(tmp_path, capsys):
    path = tmp_path / "report.json"
    path.write_text("not json")
    assert main(["compare", str(path)]) == 2
    _assert_usage_error(capsys, tmp_path, "is not valid JSON")


def test_compare_report_of_other_schema(tmp_path, capsys):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"schema_version": 99}))
    assert main(["compare", str(path)]) == 2
    _assert_usage_error(capsys, tmp_path, "has schema_version 99")


def test_import_of_missing_gguf_file(tmp_path, capsys):
    assert main(["import-gguf", str(tmp_path / "out"), "--gguf", str(tmp_path / "model.gguf")]) == 2
    _assert_usage_error(capsys, tmp_path, "model.gguf' not found")
    assert not (tmp_path / "out").exists()


def test_method_and_divergence_together(tiny_suite, tmp_path, capsys):
    assert main(["train", str(tiny_suite), "--method", "js", "--divergence", "tv"]) == 2
    _assert_usage_error(capsys, tmp_path, "--method and --divergence both choose what to train")


def test_empty_suite_file(tmp_path, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text("")
    assert main(["run", str(path)]) == 2
    _assert_usage_error(capsys, tmp_path, "the suite file is empty")


def test_import_of_file_that_is_not_gguf(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")
    assert main(["import-gguf", str(tmp_path / "out"), "--gguf", str(fake)]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "could not read" in captured.err
    assert not (tmp_path / "out").exists()


def test_unknown_device(tiny_suite, tmp_path, capsys):
    assert main(["audit", str(tiny_suite), "--model", "embedded:austen", "--device", "tpu"]) == 2
    _assert_usage_error(capsys, tmp_path, "unknown device 'tpu'; choose auto, cpu, cuda, cuda:N or mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tiny_suite, tmp_path, capsys):
    assert main(["--no-progress", "train", str(tiny_suite), "--method", "js", "--device", "cuda"]) == 2
    _assert_usage_error(capsys, tmp_path, "device 'cuda' was requested, but CUDA is not available here")


def test_resume_without_checkpoint(tiny_suite, tmp_path, capsys):
    assert main(["--no-progress", "train", str(tiny_suite), "--method", "js", "--resume"]) == 2
    _assert_usage_error(capsys, tmp_path, "--resume: no complete checkpoint of js in")


def test_second_run_in_busy_folder(tiny_suite, tmp_path, capsys):
    import fcntl

    folder = tmp_path / "busy" / "js"
    folder.mkdir(parents=True)
    with (folder / ".lock").open("a+") as held:
        # This open file description plays the first run: flock conflicts with any other one.
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        arguments = ["--no-progress", "train", str(tiny_suite), "--method", "js", "--output", str(tmp_path / "busy")]
        assert main(arguments) == 2
    _assert_usage_error(capsys, tmp_path, "another run is training in")
    assert sorted(path.name for path in folder.iterdir()) == [".lock"]


def test_checkpoint_with_pickled_weights_only(tiny_suite, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    from fdiv_eval.base_model import embedded_model_path

    folder = tmp_path / "pickled"
    shutil.copytree(embedded_model_path(), folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert main(["--no-progress", "audit", str(tiny_suite), "--model", f"pickled={folder}"]) == 2
    _assert_usage_error(capsys, tmp_path, "has no .safetensors weights (found pytorch_model.bin)")

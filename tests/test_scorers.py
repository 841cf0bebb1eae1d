"""Scorers, and the one-line errors (exit status 2) for bad targets and scorers in a suite."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import yaml

from fdiv_eval.cli import main
from fdiv_eval.errors import InvalidInputError
from fdiv_eval.scorers import (
    CallableScorer,
    HFClassifierScorer,
    LengthScorer,
    RegexScorer,
    ScorerConfig,
    SklearnScorer,
    VaderScorer,
    WordScorer,
    build_scorer,
)

TRAIN_TEXTS = ["the ball was lovely", "a lovely dance", "the rain was cold", "cold and wet rain"] * 5
TRAIN_LABELS = ["happy", "happy", "sad", "sad"] * 5


def _pipeline():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(TRAIN_TEXTS, TRAIN_LABELS)


@pytest.fixture
def skops_file(tmp_path):
    import skops.io

    path = tmp_path / "mood.skops"
    skops.io.dump(_pipeline(), path)
    return path


@pytest.fixture
def pickle_file(tmp_path):
    import joblib

    path = tmp_path / "mood.joblib"
    joblib.dump(_pipeline(), path)
    return path


@pytest.fixture
def classifier_folder(tmp_path, toy_checkpoint):
    """A tiny GPT-2 sequence classifier with labels NEGATIVE and POSITIVE, saved with the toy tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=4, n_positions=16, n_embd=8, n_layer=1, n_head=2, pad_token_id=0,
                        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    folder = tmp_path / "classifier"
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(toy_checkpoint).save_pretrained(folder)
    return folder


def test_word_scorer_matches_whole_words():
    scores = WordScorer(["her"])(["Her hat", "there", "with her.", ""])
    np.testing.assert_array_equal(scores, [1.0, 0.0, 1.0, 0.0])
    assert scores.dtype == np.float64


def test_regex_scorer():
    np.testing.assert_array_equal(RegexScorer(r"\bnot\b")(["I do not", "nothing", "NOT"]), [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(RegexScorer(r"\bnot\b", ignore_case=False)(["NOT"]), [0.0])


def test_regex_scorer_rejects_invalid_pattern():
    with pytest.raises(InvalidInputError, match="is not a valid regular expression"):
        RegexScorer("(unclosed")


def test_length_scorer_units():
    np.testing.assert_array_equal(LengthScorer("words")(["a bc  d", ""]), [3.0, 0.0])
    np.testing.assert_array_equal(LengthScorer("characters")(["a bc", ""]), [4.0, 0.0])


def test_vader_scorer_sign():
    scores = VaderScorer()(["What a wonderful, happy day.", "A terrible, horrid loss.", "The table."])
    assert scores[0] > 0.5
    assert scores[1] < -0.5
    assert scores[2] == 0.0


def test_sklearn_scorer_from_skops(skops_file):
    scorer = SklearnScorer(skops_file, "happy")
    probabilities = scorer(["a lovely ball", "cold rain"])
    expected = _pipeline().predict_proba(["a lovely ball", "cold rain"])[:, 0]
    np.testing.assert_allclose(probabilities, expected, rtol=1e-12)
    assert probabilities[0] > 0.5 > probabilities[1]
    decision = SklearnScorer(skops_file, "happy", output="decision")(["a lovely ball"])
    assert decision[0] > 0


def test_sklearn_scorer_unknown_label(skops_file):
    with pytest.raises(InvalidInputError, match="label 'angry' not found .* available labels: happy, sad"):
        SklearnScorer(skops_file, "angry")


def test_sklearn_pickle_needs_opt_in(pickle_file):
    with pytest.raises(InvalidInputError, match="is a pickle, and loading it can run arbitrary code"):
        SklearnScorer(pickle_file, "happy")
    scorer = SklearnScorer(pickle_file, "happy", allow_pickle=True)
    assert scorer(["a lovely ball"])[0] > 0.5


def test_hf_classifier_probability_and_logit(classifier_folder):
    import torch
    from transformers import AutoModelForSequenceClassification

    texts = ["a b c", "c c", "b"]
    probability = HFClassifierScorer(classifier_folder, "POSITIVE", batch_size=2)(texts)
    logit = HFClassifierScorer(classifier_folder, "POSITIVE", output="logit")(texts)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_folder).eval()
    expected = []
    for text in texts:
        ids = torch.tensor([[{"a": 1, "b": 2, "c": 3}[word] for word in text.split()]])
        with torch.no_grad():
            expected.append(model(input_ids=ids).logits[0].double())
    expected = torch.stack(expected)
    np.testing.assert_allclose(logit, expected[:, 1].numpy(), rtol=1e-5)
    np.testing.assert_allclose(probability, torch.softmax(expected, dim=-1)[:, 1].numpy(), rtol=1e-5)


def test_hf_classifier_unknown_label(classifier_folder):
    with pytest.raises(InvalidInputError, match="label 'joy' not found .* available labels: NEGATIVE, POSITIVE"):
        HFClassifierScorer(classifier_folder, "joy")


def test_callable_scorer_with_and_without_prompts(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length(texts):
            return [len(t) for t in texts]

        def echo_prompt(texts, prompts):
            return [len(p or "") for p in (prompts or [None] * len(texts))]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    np.testing.assert_array_equal(CallableScorer("my_rewards:length")(["ab", ""]), [2.0, 0.0])
    np.testing.assert_array_equal(CallableScorer("my_rewards:echo_prompt")(["x", "y"], ["abc", "a"]), [3.0, 1.0])
    with pytest.raises(InvalidInputError, match="has no attribute 'missing'"):
        CallableScorer("my_rewards:missing")


def test_callable_scorer_wrong_count(tmp_path, monkeypatch):
    (tmp_path / "short_rewards.py").write_text("def score(texts):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InvalidInputError, match="returned 1 values for 2 texts"):
        CallableScorer("short_rewards:score")(["a", "b"])


def test_build_scorer_unknown_type():
    with pytest.raises(InvalidInputError, match="unknown scorer type 'magic' in target.reward"):
        build_scorer(ScorerConfig(type="magic"), where="target.reward")


# Suites with bad targets: each gets one line on stderr and exit status 2.


def _write_suite(tiny_suite, target: dict, methods=("gdc",)):
    data = yaml.safe_load(tiny_suite.read_text())
    data["target"] = target
    data["train"]["methods"] = list(methods)
    tiny_suite.write_text(yaml.safe_dump(data))
    return tiny_suite


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err
    assert len(lines) == 1, captured.err
    return lines[0]


def _distributional(moment: float, words: list[str]) -> dict:
    return {"type": "distributional", "fit_samples": 64,
            "features": [{"name": "feature_x", "moment": moment, "scorer": {"type": "words", "words": words}}]}


def test_cli_moment_outside_reachable_range(tiny_suite, capsys):
    _write_suite(tiny_suite, _distributional(1.5, ["she", "her"]))
    assert main(["--no-progress", "train", str(tiny_suite)]) == 2
    assert "moment 1.5 of feature 'feature_x' is outside the range" in _error_line(capsys)


def test_cli_feature_that_never_fires(tiny_suite, capsys):
    _write_suite(tiny_suite, _distributional(0.5, ["zyzzyva"]))
    assert main(["--no-progress", "train", str(tiny_suite)]) == 2
    assert "feature 'feature_x' never fires" in _error_line(capsys)


@pytest.mark.parametrize("beta", [0, -0.5])
def test_cli_beta_not_positive(tiny_suite, capsys, beta):
    _write_suite(tiny_suite, {"type": "reward", "reward": {"type": "length"}, "beta": beta})
    assert main(["--no-progress", "train", str(tiny_suite)]) == 2
    assert "suite field 'target.beta' must be a positive number" in _error_line(capsys)


def test_cli_unknown_scorer(tiny_suite, capsys):
    _write_suite(tiny_suite, {"type": "reward", "reward": {"type": "bert_score"}, "beta": 1.0})
    assert main(["--no-progress", "train", str(tiny_suite)]) == 2
    assert "unknown scorer type 'bert_score' in target.reward" in _error_line(capsys)


def test_cli_callable_that_does_not_import(tiny_suite, capsys):
    _write_suite(tiny_suite, {"type": "reward", "reward": {"type": "callable", "function": "no_such_module:score"},
                              "beta": 1.0})
    assert main(["--no-progress", "train", str(tiny_suite)]) == 2
    assert "module 'no_such_module' could not be imported" in _error_line(capsys)


def test_cli_classifier_label_that_does_not_exist(tiny_suite, skops_file, capsys):
    _write_suite(tiny_suite, {"type": "reward", "beta": 1.0,
                              "reward": {"type": "sklearn", "path": str(skops_file), "label": "angry"}})
    assert main(["--no-progress", "train", str(tiny_suite)]) == 2
    assert "label 'angry' not found" in _error_line(capsys)


def test_cli_hf_classifier_label_that_does_not_exist(tiny_suite, classifier_folder, capsys):
    _write_suite(tiny_suite, {"type": "reward", "beta": 1.0,
                              "reward": {"type": "hf_classifier", "path": str(classifier_folder), "label": "joy"}})
    assert main(["--no-progress", "train", str(tiny_suite)]) == 2
    assert "available labels: NEGATIVE, POSITIVE" in _error_line(capsys)


def test_cli_pickle_without_opt_in(tiny_suite, pickle_file, capsys):
    _write_suite(tiny_suite, {"type": "reward", "beta": 1.0,
                              "reward": {"type": "sklearn", "path": str(pickle_file), "label": "happy"}})
    assert main(["--no-progress", "train", str(tiny_suite)]) == 2
    assert "set allow_pickle: true" in _error_line(capsys)


def test_cli_scorer_path_relative_to_suite(tiny_suite, skops_file, capsys):
    skops_file.rename(tiny_suite.parent / "relative.skops")
    _write_suite(tiny_suite, {"type": "reward", "beta": 1.0,
                              "reward": {"type": "sklearn", "path": "relative.skops", "label": "nope"}})
    assert main(["--no-progress", "train", str(tiny_suite)]) == 2
    # The file was found next to the suite: the error is about the label, not the path.
    assert "label 'nope' not found" in _error_line(capsys)


def test_quickstart_suite_still_loads():
    from fdiv_eval.suite import load_suite

    suite = load_suite("suites/quickstart.yaml")
    assert suite.target.type == "word_list"
    assert suite.target.words == ("mother", "father", "sister", "brother", "daughter")


@pytest.mark.parametrize("name", ["distributional", "sentiment_beta_0_1", "sentiment_beta_1", "emma_style"])
def test_shipped_suites_build_their_targets(name):
    from pathlib import Path

    from fdiv_eval.suite import load_suite
    from fdiv_eval.targets import target_from_config

    suite = load_suite(f"suites/{name}.yaml")
    target = target_from_config(suite.target, Path("suites"))
    assert target.kind in ("distributional", "reward")



"""The local `evaluate` modules load offline from their folders and match closed forms."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

evaluate = pytest.importorskip("evaluate")

MODULES = Path(__file__).resolve().parents[1] / "fdiv_eval" / "evaluate_modules"


def test_f_divergence_module_matches_closed_forms():
    metric = evaluate.load(str(MODULES / "f_divergence"))
    # Samples in exact proportion to π = (1/2, 1/4, 1/4), so each sample mean is the expectation under π.
    policy = np.array([0.5, 0.25, 0.25])
    target = np.array([0.2, 0.3, 0.5])
    outcomes = [0, 0, 1, 2]
    result = metric.compute(log_probs=np.log(policy[outcomes]).tolist(),
                            target_log_probs=np.log(target[outcomes]).tolist())
    mixture = (policy + target) / 2
    expected = {
        "reverse_kl": float(np.sum(policy * np.log(policy / target))),
        "forward_kl": float(np.sum(target * np.log(target / policy))),
        "js": float(0.5 * np.sum(policy * np.log(policy / mixture)) + 0.5 * np.sum(target * np.log(target / mixture))),
        "tv": float(0.5 * np.abs(policy - target).sum()),
        "hellinger": float(1 - np.sum(np.sqrt(policy * target))),
        "chi2_pearson": float(np.sum((policy - target) ** 2 / target)),
        "chi2_neyman": float(np.sum((policy - target) ** 2 / policy)),
    }
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-12), name
        assert result[f"{name}_ci_low"] <= result[name] <= result[f"{name}_ci_high"]
    assert result["n"] == 4


def test_f_divergence_module_unnormalized_target():
    metric = evaluate.load(str(MODULES / "f_divergence"))
    log_probs = [math.log(0.5), math.log(0.5)]
    # P = 3·p with p = π: the divergence is 0 once log Z = log 3 is subtracted.
    result = metric.compute(log_probs=log_probs, target_log_probs=[math.log(1.5)] * 2,
                            target_log_partition=math.log(3.0), divergences=["js", "tv"])
    assert result["js"] == pytest.approx(0.0, abs=1e-15)
    assert result["tv"] == pytest.approx(0.0, abs=1e-15)
    assert "forward_kl" not in result


def test_diversity_module():
    import sacrebleu

    metric = evaluate.load(str(MODULES / "diversity"))
    texts = ["the cat sat", "the dog sat", "a cat ran"]
    result = metric.compute(predictions=texts, orders=[1, 2], bootstrap_resamples=20)
    # Unigrams: 9 in all, 6 distinct (the, cat, sat, dog, a, ran); bigrams: 6 in all, 6 distinct.
    assert result["distinct_1_corpus"] == pytest.approx(6 / 9)
    assert result["distinct_2_corpus"] == pytest.approx(1.0)
    # Self-BLEU is a fraction in [0, 1]: sacrebleu's 0-100 sentence BLEU divided by 100.
    expected_bleu = np.mean([sacrebleu.sentence_bleu(text, [t for t in texts if t != text]).score for text in texts]) / 100
    assert result["self_bleu"] == pytest.approx(expected_bleu)
    assert result["n"] == 3

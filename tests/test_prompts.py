"""Prompts: loading, conditional scoring, the cluster bootstrap, and a conditional run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fdiv_eval.cli import main
from fdiv_eval.errors import InvalidInputError
from fdiv_eval.prompts import build_contexts, cluster_bootstrap, load_prompts, per_prompt_count
from fdiv_eval.sequences import SampleBatch, load_model, load_tokenizer, score
from fdiv_eval.suite import PromptsConfig


def test_load_inline_prompts():
    assert load_prompts(PromptsConfig(texts=("a b", "c"))) == ["a b", "c"]
    assert load_prompts(PromptsConfig(texts=("a b", "c", "b"), limit=2)) == ["a b", "c"]


def test_load_prompts_from_text_and_jsonl(tmp_path):
    (tmp_path / "prompts.txt").write_text("She was\nHe said\n")
    assert load_prompts(PromptsConfig(file="prompts.txt"), tmp_path) == ["She was", "He said"]
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"opening": "It is"}) + "\n")
    assert load_prompts(PromptsConfig(file="prompts.jsonl", column="opening"), tmp_path) == ["It is"]


def test_load_prompts_missing_column(tmp_path):
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"opening": "It is"}) + "\n")
    with pytest.raises(InvalidInputError, match="has no column 'prompt'; set prompts.column to one of: opening"):
        load_prompts(PromptsConfig(file="prompts.jsonl"), tmp_path)


def test_load_prompts_missing_file(tmp_path):
    with pytest.raises(InvalidInputError, match="prompts file 'absent.txt' not found"):
        load_prompts(PromptsConfig(file="absent.txt"), tmp_path)


def test_empty_prompt_rejected():
    with pytest.raises(InvalidInputError, match="prompt 1 is empty"):
        load_prompts(PromptsConfig(texts=("a", "  ")))


def test_per_prompt_count():
    assert per_prompt_count(100, 30) == 4
    assert per_prompt_count(10, 30) == 2


def test_conditional_log_prob_is_chain_rule_difference(toy_checkpoint):
    """log π(x|c) from the prompt context equals log π(c x) − log π(c), both scored from BOS."""
    tokenizer = load_tokenizer(toy_checkpoint)
    model = load_model(toy_checkpoint, dtype=torch.float64)
    context = build_contexts(tokenizer, ["a b"])[0]
    assert context.prompt_ids.tolist() == [0, 1, 2]
    continuation = torch.tensor([[3, 1, 0], [2, 0, 0]])
    lengths = torch.tensor([3, 2])
    conditional = score(model, SampleBatch(context.prompt_ids, continuation, lengths)).log_prob

    bos = torch.tensor([0])
    prompt_only = score(model, SampleBatch(bos, torch.tensor([[1, 2]]), torch.tensor([2]))).log_prob
    joined = torch.tensor([[1, 2, 3, 1, 0], [1, 2, 2, 0, 0]])
    joint = score(model, SampleBatch(bos, joined, torch.tensor([5, 4]))).log_prob
    torch.testing.assert_close(conditional, joint - prompt_only, rtol=0, atol=1e-10)


def test_cluster_bootstrap_mean_over_prompts():
    # Prompt means 0, 1, 2, 3, 4 with no spread inside a prompt: the value is
    # the mean of the prompt means, and the bootstrap SE is the between-prompt
    # SE sd·sqrt((C − 1)/C)/sqrt(C) of the plug-in bootstrap.
    per_prompt = [np.full(10, float(c)) for c in range(5)]
    estimate = cluster_bootstrap(lambda c, rows, _: float(per_prompt[c][rows].mean()), [10] * 5, [4] * 5,
                                 resamples=4000, seed=0)
    assert estimate.value == 2.0
    expected = np.std(np.arange(5.0)) / np.sqrt(5)
    assert estimate.standard_error == pytest.approx(expected, rel=0.05)
    assert estimate.ci_low < 2.0 < estimate.ci_high
    assert estimate.method == "mean-over-prompts+cluster-bootstrap"


def test_cluster_bootstrap_includes_within_prompt_noise():
    # One prompt only: the SE is the within-prompt SE of a mean, sd/sqrt(n) up to the plug-in factor.
    values = np.random.default_rng(1).normal(size=400)
    estimate = cluster_bootstrap(lambda c, rows, _: float(values[rows].mean()), [400], [2], resamples=2000, seed=3)
    assert estimate.standard_error == pytest.approx(values.std() / 20, rel=0.08)


CONDITIONAL_SUITE = """
name: cond
base_model: embedded:austen
max_new_tokens: 8
prompts:
  texts: ["She was", "He said", "It is"]
target:
  type: reward
  reward: {{type: vader}}
  beta: 0.2
train:
  methods: [gdc]
  steps: 2
  batch_size: 12
  prompts_per_step: 2
  checkpoint_every: 1
  log_partition_samples: 24
audit:
  samples: 12
  base_samples: 24
  batch_size: 64
  self_bleu_samples: 4
  bootstrap_resamples: 20
runs_dir: {runs}
report_dir: {reports}
"""


def test_conditional_run_end_to_end(tmp_path, capsys):
    suite = tmp_path / "cond.yaml"
    suite.write_text(CONDITIONAL_SUITE.format(runs=tmp_path / "runs", reports=tmp_path / "reports"))
    assert main(["--no-progress", "run", str(suite)]) == 0

    state = json.loads((tmp_path / "runs" / "gdc" / "final" / "trainer_state.json").read_text())
    assert len(state["log_partition_log_sums"]) == 3
    assert sum(state["log_partition_counts"]) > 24

    report = json.loads((tmp_path / "reports" / "report.json").read_text())
    assert report["settings"]["prompts"] == 3
    for model in report["models"]:
        assert len(model["info"]["per_prompt"]) == 3
        for name in ("reward", "target_reward", "rlhf_objective", "forward_kl", "js"):
            assert model["metrics"][name]["method"] == "mean-over-prompts+cluster-bootstrap"
    base = report["models"][0]
    rows = base["info"]["per_prompt"]
    assert base["metrics"]["reward"]["value"] == pytest.approx(np.mean([row["reward"] for row in rows]))
    assert base["metrics"]["kl_to_base"]["value"] == 0.0
    assert "## Per-prompt extremes" in (tmp_path / "reports" / "report.md").read_text()


def test_one_prompt_statistics_match_unconditional_estimators():
    from fdiv_eval.conditional import PromptBaseSample, _PromptPolicySample, _statistics
    from fdiv_eval.divergences import DIVERGENCES
    from fdiv_eval.estimators import forward_kl_from_base, log_partition, policy_divergence
    from fdiv_eval.prompts import Context
    from fdiv_eval.scorers import LengthScorer
    from fdiv_eval.targets import RewardTarget

    generator = np.random.default_rng(0)
    n, m = 50, 80
    log_policy, log_base, log_potential = (generator.normal(-5, 1, n), generator.normal(-5, 1, n),
                                           generator.normal(0, 1, n))
    base_log_base, base_log_potential, policy_on_base = (generator.normal(-5, 1, m), generator.normal(0, 1, m),
                                                         generator.normal(-5, 1, m))
    policy_sample = _PromptPolicySample(["x"] * n, np.ones(n), log_policy, log_base, log_potential, np.zeros(n),
                                        np.zeros(n), np.ones(n, dtype=bool), np.zeros(n), policy_on_base)
    base_sample = PromptBaseSample(Context(0, None, torch.tensor([0])), None, ["x"] * m, base_log_base,
                                   base_log_potential, log_partition(base_log_potential), np.zeros(m))
    statistics = _statistics(RewardTarget(LengthScorer(), 1.0), [policy_sample], [base_sample])
    rows, base_rows = np.arange(n), np.arange(m)
    log_z = log_partition(base_log_potential)

    for name, divergence in DIVERGENCES.items():
        expected = policy_divergence(divergence, log_policy - (log_base + log_potential), log_z).value
        assert statistics[name](0, rows, base_rows) == pytest.approx(expected, rel=1e-12), name
    expected = forward_kl_from_base(base_log_potential, base_log_base - policy_on_base).value
    assert statistics["forward_kl_from_base"](0, rows, base_rows) == pytest.approx(expected, rel=1e-12)


def test_chat_template_without_template_is_rejected(toy_checkpoint):
    from fdiv_eval.errors import InvalidInputError
    from fdiv_eval.sequences import load_tokenizer

    tokenizer = load_tokenizer(toy_checkpoint)
    with pytest.raises(InvalidInputError, match="has no chat template; set prompts.chat_template to false"):
        build_contexts(tokenizer, ["a b"], chat_template=True)

"""Names, units and directions of the metrics that an audit reports.

``direction`` names the better direction: ``lower`` for divergences to the
target, ``higher`` for constraint satisfaction, ``none`` where neither is
better in general (drift from the base model, diversity, length).
"""

from __future__ import annotations

from dataclasses import dataclass

from fdiv_eval.errors import InvalidInputError


@dataclass(frozen=True)
class MetricInfo:
    label: str
    direction: str
    """``lower``, ``higher`` or ``none``."""
    unit: str
    description: str


METRICS: dict[str, MetricInfo] = {
    "forward_kl": MetricInfo("KL(p‖π)", "lower", "nats", "forward KL from the target to the model (GDC objective)"),
    "reverse_kl": MetricInfo("KL(π‖p)", "lower", "nats",
                             "reverse KL from the model to the target (RLHF objective); +∞ if any sample has P = 0"),
    "reverse_kl_on_support": MetricInfo("KL(π_S‖p)", "lower", "nats",
                                        "reverse KL of the model restricted to the target's support"),
    "js": MetricInfo("JS", "lower", "nats", "Jensen–Shannon divergence (not the distance), at most log 2"),
    "tv": MetricInfo("TV", "lower", "", "total variation distance ½·Σ|π − p|, at most 1"),
    "hellinger": MetricInfo("H²", "lower", "", "squared Hellinger distance 1 − Σ√(π·p), at most 1"),
    "chi2_pearson": MetricInfo("χ²(π‖p)", "lower", "", "Pearson χ² divergence of the model from the target"),
    "chi2_neyman": MetricInfo("χ²(p‖π)", "lower", "", "Neyman χ² divergence"),
    "forward_kl_from_base": MetricInfo("KL(p‖π) base-IS", "lower", "nats",
                                       "forward KL estimated from base-model samples only (cross-check)"),
    "constraint_satisfaction": MetricInfo("E_π[b]", "higher", "fraction",
                                          "fraction of samples that satisfy the constraint"),
    "kl_to_base": MetricInfo("KL(π‖π0)", "none", "nats", "drift from the base model, sequence-level estimator"),
    "kl_to_base_k3": MetricInfo("KL(π‖π0) k3", "none", "nats",
                                "drift from the base model, mean of r − 1 − log r with r = π0/π (never negative per sample)"),
    "kl_to_base_tokenwise": MetricInfo("KL(π‖π0) tok", "none", "nats",
                                       "drift from the base model, sum of exact per-token KLs along sampled prefixes"),
    "sequence_entropy": MetricInfo("H(π)", "none", "nats", "entropy of the model's sequence distribution"),
    "mean_token_entropy": MetricInfo("H/token", "none", "nats", "mean per-token entropy along sampled prefixes"),
    "distinct_1": MetricInfo("dist-1", "none", "fraction", "corpus-level distinct unigrams"),
    "distinct_2": MetricInfo("dist-2", "none", "fraction", "corpus-level distinct bigrams"),
    "distinct_3": MetricInfo("dist-3", "none", "fraction", "corpus-level distinct trigrams"),
    "distinct_1_per_sample": MetricInfo("dist-1/sample", "none", "fraction",
                                        "mean over samples of each sample's distinct unigrams"),
    "distinct_2_per_sample": MetricInfo("dist-2/sample", "none", "fraction",
                                        "mean over samples of each sample's distinct bigrams"),
    "distinct_3_per_sample": MetricInfo("dist-3/sample", "none", "fraction",
                                        "mean over samples of each sample's distinct trigrams"),
    "self_bleu": MetricInfo("Self-BLEU", "none", "fraction",
                            "mean BLEU-4 (0 to 1) of each sample against all the other samples"),
    "mean_length": MetricInfo("length", "none", "tokens", "mean generated length, EOS included"),
    "reward": MetricInfo("E_π[r]", "higher", "reward", "mean reward of the model's samples"),
    "target_reward": MetricInfo("E_p[r]", "none", "reward",
                                "mean reward under the target, self-normalized from base-model samples"),
    "rlhf_objective": MetricInfo("E_π[r] − β·KL", "higher", "reward",
                                 "KL-regularized RLHF objective E_π[r] − β·KL(π‖π0)"),
}

FEATURE_METRIC_PREFIXES = {
    "moment/": ("E_π[{}]", "mean of the feature over the model's samples; compare with the desired moment"),
    "target_moment/": ("E_p[{}]", "mean of the feature under the fitted target, self-normalized from the "
                                  "independent audit base sample"),
}

SUMMARY_METRICS = (
    "forward_kl", "reverse_kl", "js", "tv", "constraint_satisfaction", "kl_to_base",
    "distinct_2", "self_bleu", "mean_length",
)
"""Metrics shown in the terminal table; reports list all of them."""


def metric_info(name: str) -> MetricInfo:
    """Return the metadata of a metric: a fixed one, ``alpha_<α>``, or a per-feature one such as ``moment/woman``.

    Unknown names get a neutral entry named after themselves.
    """
    if name in METRICS:
        return METRICS[name]
    if name.startswith("alpha_"):
        alpha = name.split("_", 1)[1]
        return MetricInfo(f"D_α={alpha}", "lower", "", f"Amari alpha-divergence with alpha = {alpha}")
    for prefix, (label, description) in FEATURE_METRIC_PREFIXES.items():
        if name.startswith(prefix):
            return MetricInfo(label.format(name[len(prefix):]), "none", "", description)
    return MetricInfo(name, "none", "", name)


def arrow(direction: str) -> str:
    return {"lower": "↓", "higher": "↑"}.get(direction, "")


def metric_convention(report: dict, name: str, model: str) -> dict[str, str]:
    """Return what fixes the meaning of a metric's number in a report.

    That is the report's conventions (log base, JS and TV forms), the
    metric's unit and description, and the ``key=value`` settings in its
    estimate's method, such as the tokenizer of distinct-n and Self-BLEU.
    """
    info = report.get("metrics", {}).get(name, {})
    entries = {entry["name"]: entry for entry in report.get("models", [])}
    if model not in entries or name not in entries[model].get("metrics", {}):
        raise InvalidInputError(f"the report has no metric {name!r} for model {model!r}")
    method = str(entries[model]["metrics"][name].get("method", ""))
    settings = sorted(part for part in method.replace("+", ",").split(",") if "=" in part)
    return {
        "conventions": str(report.get("conventions", "")),
        "unit": str(info.get("unit", "")),
        "description": str(info.get("description", "")),
        "settings": ",".join(settings),
    }


def require_same_convention(name: str, first: tuple[dict, str], second: tuple[dict, str]) -> None:
    """Raise InvalidInputError unless two reported values of ``name`` share one convention.

    ``first`` and ``second`` are (report, model name) pairs. A comparison of
    numbers computed under different conventions (a Self-BLEU on 0–100 against
    one on 0–1, distinct-n under two tokenizers) would look like a change of
    the model, so reports and CI checks call this before comparing.
    """
    left = metric_convention(first[0], name, first[1])
    right = metric_convention(second[0], name, second[1])
    differing = [key for key in left if left[key] != right[key]]
    if differing:
        details = "; ".join(f"{key}: {left[key]!r} vs {right[key]!r}" for key in differing)
        raise InvalidInputError(
            f"metric {name!r} of {first[1]!r} and {second[1]!r} was computed under different conventions "
            f"({details}); recompute both with the same version and settings before comparing them"
        )

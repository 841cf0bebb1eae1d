"""Suite files: one YAML document that declares a whole experiment.

A suite names the base model, the target, the methods to train, the audit
settings and where outputs go. It loads into frozen dataclasses; every default
lives in the dataclass fields below. An unknown or mistyped key fails at load
with its dotted path (for example ``train.learning_rat``).

Example::

    name: quickstart
    base_model: embedded:austen
    max_new_tokens: 32
    target:
      type: word_list
      words: [love, heart]
      epsilon: 0.001
    train:
      methods: [rlhf, gdc, js, tv]
      steps: 80
    audit:
      samples: 1024
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fdiv_eval.divergences import DIVERGENCES, PRESETS, get_divergence
from fdiv_eval.errors import InvalidInputError
from fdiv_eval.scorers import ScorerConfig

OPTIMIZERS = ("adamw", "sgd", "rmsprop")
BASELINES = ("mean", "leave_one_out", "none")
TARGET_TYPES = ("word_list", "pointwise", "distributional", "reward")


@dataclass(frozen=True)
class FeatureConfig:
    """One feature φ_k of a distributional target and its desired moment."""

    name: str = ""
    """Name used in reports, for example ``mentions_woman``."""
    moment: float | None = None
    """Desired moment μ̄_k = E_p[φ_k]; for a 0/1 feature, the desired fraction of samples."""
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    """How φ_k is computed (see ``fdiv_eval.scorers``)."""


@dataclass(frozen=True)
class TargetConfig:
    """The target P(x) = π0(x)·Φ(x).

    ``word_list``: Φ = max(b, ε) with b from ``words``. ``pointwise``: the
    same with b from the ``constraint`` scorer (b = score ≥ 0.5).
    ``distributional``: Φ = exp(λ·φ) for ``features``, λ fitted on base
    samples. ``reward``: Φ = exp(r/β) with r from ``reward``. The last two
    are multiplied by max(b, ε) when ``constraint`` or ``words`` is given.
    """

    type: str = "word_list"
    """``word_list``, ``pointwise``, ``distributional`` or ``reward``."""
    words: tuple[str, ...] = ()
    """b(x) = 1 when the text contains any of these words (whole word, case-insensitive)."""
    epsilon: float = 0.0
    """Floor ε of the potential, in [0, 1). 0 is a hard constraint; reverse KL and
    Pearson χ² training need ε > 0 because they are infinite otherwise."""
    constraint: ScorerConfig | None = None
    """A scorer that defines the pointwise constraint b (in place of ``words``)."""
    features: tuple[FeatureConfig, ...] = ()
    """``distributional``: the features φ_k and their desired moments μ̄_k."""
    reward: ScorerConfig | None = None
    """``reward``: the scorer that gives r(x)."""
    beta: float | None = None
    """``reward``: temperature β > 0 of exp(r/β); in the units of the reward."""
    fit_samples: int = 4096
    """``distributional``: base-model samples on which λ is fitted (in total over prompts)."""
    fit_seed: int = 7
    """``distributional``: seed of the fit sample, so training and audit fit the same λ."""


@dataclass(frozen=True)
class TrainConfig:
    """f-DPG training settings, shared by every method of the suite."""

    methods: tuple[str, ...] = ("rlhf", "gdc", "js", "tv")
    """Presets (``rlhf`` = reverse_kl, ``gdc`` = forward_kl) or divergence names."""
    alpha: float | None = None
    """α of the ``alpha`` divergence, when that method is listed."""
    steps: int = 80
    """Optimizer steps per method."""
    batch_size: int = 128
    """Policy samples per step."""
    learning_rate: float = 2e-4
    optimizer: str = "adamw"
    """``adamw``, ``sgd`` or ``rmsprop``."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping threshold on the global L2 norm."""
    baseline: str = "mean"
    """Pseudo-reward baseline: ``mean`` (batch mean), ``leave_one_out`` or ``none``."""
    checkpoint_every: int = 40
    """Write a resumable checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 0
    """Keep only the newest this many ``step-*`` checkpoints (``final/`` is always kept); 0 keeps all."""
    log_partition_samples: int = 2048
    """Base-model samples that start the running estimate of log Z (split across prompts, if any)."""
    seed: int = 0
    prompts_per_step: int = 8
    """With prompts: prompts drawn per step; each gets batch_size // prompts_per_step samples."""


@dataclass(frozen=True)
class AuditConfig:
    """Audit settings: sample sizes and estimator options."""

    samples: int = 1024
    """Policy samples per audited model."""
    base_samples: int = 4096
    """Independent base-model samples for log Z and the forward-KL cross-check."""
    batch_size: int = 256
    """Sequences per generate call and per scoring pass."""
    self_bleu_samples: int = 200
    """Self-BLEU uses at most this many samples: a random subset, drawn with the model's seed, of larger samples."""
    bootstrap_resamples: int = 200
    """Resamples for the standard errors of distinct-n."""
    seed: int = 1234
    alphas: tuple[float, ...] = ()
    """α values of extra Amari α-divergence metrics (reported as ``alpha_<α>``)."""
    pairwise: bool = True
    """Estimate KL and JS between every pair of audited models on their own samples."""
    exact: bool = False
    """Also compute every metric exactly by enumerating all sequences (small vocabularies only)."""
    exact_limit: int = 1_000_000
    """Largest number of sequences exact mode may enumerate."""


@dataclass(frozen=True)
class PromptsConfig:
    """Prompts that condition generation; each prompt c gets its own target p_c, Z_c and baseline."""

    texts: tuple[str, ...] = ()
    """Inline prompts."""
    file: str = ""
    """A file that ``datasets`` reads (``.txt`` with one prompt per line, ``.json``, ``.jsonl``, ``.csv``,
    ``.parquet``). Relative paths are taken from the suite file's folder."""
    column: str = "prompt"
    """Column of ``file`` that contains the prompt text (``.txt`` files always use their lines)."""
    limit: int | None = None
    """Use only the first this many prompts of the file."""
    chat_template: bool = False
    """Wrap each prompt as a user message in the base tokenizer's chat template, assistant turn opened."""


@dataclass(frozen=True)
class CheckRule:
    """One regression rule of ``fdiv check``: a metric may not get worse than the baseline's.

    The rule fails only when the data show, at ``confidence``, that the
    current value is worse than the baseline value by more than ``tolerance``.
    """

    metric: str
    """Metric key of the audit report, for example ``forward_kl`` or ``constraint_satisfaction``."""
    direction: str | None = None
    """Better direction, ``lower`` or ``higher``. Defaults to the metric's own direction and is
    required for metrics without one (drift, diversity, length)."""
    tolerance: float = 0.0
    """Largest worsening that still passes, in the metric's unit (absolute, not relative)."""
    confidence: float = 0.95
    """One-sided confidence that the worsening exceeds ``tolerance`` before the rule fails, in (0.5, 1)."""
    model: str | None = None
    """Model name (report row) the rule applies to; every model present in both reports when unset."""


@dataclass(frozen=True)
class Suite:
    """A whole experiment: base model, target, training and audit."""

    name: str
    base_model: str = "embedded:austen"
    """``embedded:austen`` (the shipped Austen GPT-2), a local checkpoint folder, or a hub id."""
    trust_remote_code: bool = False
    """Let checkpoints run their own Python model code (transformers' ``trust_remote_code``); off by default."""
    max_new_tokens: int = 32
    """Horizon T of every generated sequence, in tokens (EOS included)."""
    target: TargetConfig = field(default_factory=TargetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    prompts: PromptsConfig | None = None
    """Prompts to condition on; without them every sample continues the BOS token."""
    runs_dir: str = "runs/{name}"
    """Folder for checkpoints, relative to the working directory; ``{name}`` is replaced by the suite name."""
    report_dir: str = "reports/{name}"
    """Folder for reports, relative to the working directory; ``{name}`` is replaced by the suite name."""
    checks: tuple[CheckRule, ...] = ()
    """Regression rules that ``fdiv check`` applies to a current audit against a baseline audit."""

    @property
    def runs_path(self) -> Path:
        return Path(self.runs_dir.format(name=self.name))

    @property
    def report_path(self) -> Path:
        return Path(self.report_dir.format(name=self.name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def content_hash(self) -> str:
        """SHA-256 of the suite's canonical JSON, first 16 hex digits.

        ``checks`` and ``train.keep_checkpoints`` are left out: they change no
        checkpoint's weights and no audit, so editing them keeps resumable runs
        and comparable reports.
        """
        data = self.to_dict()
        data.pop("checks", None)
        # How many checkpoints stay on disk changes no result either.
        data["train"].pop("keep_checkpoints", None)
        # Left out while off, so suites written before the field existed keep their hash.
        if not data.get("trust_remote_code"):
            data.pop("trust_remote_code", None)
        canonical = json.dumps(data, sort_keys=True, default=list)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _convert(value: Any, annotation: Any, path: str) -> Any:
    """Convert a YAML value to the annotated field type, or raise naming ``path``."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        options = [a for a in arguments if a is not type(None)]
        return _convert(value, options[0], path)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise InvalidInputError(f"suite field {path!r} must be a mapping, got {value!r}")
        return _build(annotation, value, path + ".")
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise InvalidInputError(f"suite field {path!r} must be a list, got {value!r}")
        return tuple(_convert(item, arguments[0], f"{path}[{i}]") for i, item in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise InvalidInputError(f"suite field {path!r} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInputError(f"suite field {path!r} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInputError(f"suite field {path!r} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise InvalidInputError(f"suite field {path!r} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported suite field type {annotation!r} at {path}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = unknown[0]
        raise InvalidInputError(
            f"unknown suite field {prefix + str(key)!r}; allowed here: {', '.join(sorted(names))}"
        )
    values = {key: _convert(value, hints[key], prefix + key) for key, value in data.items()}
    try:
        return cls(**values)
    except TypeError as error:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        raise InvalidInputError(f"missing suite field {prefix + missing[0]!r}" if missing else str(error)) from error


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidInputError(message)


def validate_suite(suite: Suite) -> None:
    """Check values and combinations that the types alone do not catch."""
    _require(bool(suite.name.strip()) and "/" not in suite.name,
             f"suite field 'name' must be a non-empty name without '/', got {suite.name!r}")
    _require(1 <= suite.max_new_tokens <= 1024,
             f"suite field 'max_new_tokens' must be between 1 and 1024, got {suite.max_new_tokens}")

    target = suite.target
    _require(target.type in TARGET_TYPES,
             f"unknown target type {target.type!r}; choose one of: {', '.join(TARGET_TYPES)}")
    _validate_target(target)

    train = suite.train
    _require(len(train.methods) > 0, "suite field 'train.methods' must list at least one method")
    _require(len(set(train.methods)) == len(train.methods),
             f"suite field 'train.methods' lists a method twice: {list(train.methods)}")
    for method in train.methods:
        divergence = get_divergence(method, train.alpha)
        if divergence.needs_full_support and _has_constraint(target) and target.epsilon == 0.0:
            raise InvalidInputError(
                f"method {method!r} minimizes {divergence.name}, which is infinite for a hard constraint "
                "(target.epsilon = 0): set target.epsilon to a small positive value such as 0.001"
            )
    _require(train.steps >= 1, f"suite field 'train.steps' must be at least 1, got {train.steps}")
    _require(train.batch_size >= 2, f"suite field 'train.batch_size' must be at least 2, got {train.batch_size}")
    _require(train.learning_rate > 0, f"suite field 'train.learning_rate' must be positive, got {train.learning_rate}")
    _require(train.optimizer in OPTIMIZERS,
             f"unknown optimizer {train.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    _require(train.baseline in BASELINES,
             f"unknown baseline {train.baseline!r}; choose one of: {', '.join(BASELINES)}")
    _require(train.max_grad_norm > 0, f"suite field 'train.max_grad_norm' must be positive, got {train.max_grad_norm}")
    _require(train.checkpoint_every >= 1,
             f"suite field 'train.checkpoint_every' must be at least 1, got {train.checkpoint_every}")
    _require(train.keep_checkpoints >= 0,
             f"suite field 'train.keep_checkpoints' must be 0 (keep all) or more, got {train.keep_checkpoints}")
    _require(train.log_partition_samples >= 1,
             f"suite field 'train.log_partition_samples' must be at least 1, got {train.log_partition_samples}")

    if suite.prompts is not None:
        prompts = suite.prompts
        _require(bool(prompts.texts) != bool(prompts.file),
                 "suite section 'prompts' needs exactly one of 'texts' (a list) or 'file' (a path)")
        _require(prompts.limit is None or prompts.limit >= 1,
                 f"suite field 'prompts.limit' must be at least 1, got {prompts.limit}")
        _require(1 <= train.prompts_per_step <= train.batch_size // 2,
                 f"suite field 'train.prompts_per_step' must lie between 1 and batch_size / 2 "
                 f"({train.batch_size // 2}), got {train.prompts_per_step}")

    audit = suite.audit
    _require(audit.samples >= 2, f"suite field 'audit.samples' must be at least 2, got {audit.samples}")
    _require(audit.base_samples >= 2, f"suite field 'audit.base_samples' must be at least 2, got {audit.base_samples}")
    _require(audit.batch_size >= 1, f"suite field 'audit.batch_size' must be at least 1, got {audit.batch_size}")
    _require(audit.self_bleu_samples >= 2,
             f"suite field 'audit.self_bleu_samples' must be at least 2, got {audit.self_bleu_samples}")
    _require(audit.exact_limit >= 1, f"suite field 'audit.exact_limit' must be at least 1, got {audit.exact_limit}")
    for alpha in audit.alphas:
        get_divergence("alpha", alpha)
    _require(audit.bootstrap_resamples >= 10,
             f"suite field 'audit.bootstrap_resamples' must be at least 10, got {audit.bootstrap_resamples}")
    for index, rule in enumerate(suite.checks):
        validate_check_rule(rule, f"checks[{index}]")


def validate_check_rule(rule: CheckRule, path: str) -> None:
    """Check a rule's metric, direction, tolerance and confidence; ``path`` names it in errors."""
    from fdiv_eval.metrics import METRICS

    _require(rule.metric in METRICS,
             f"suite field '{path}.metric' is {rule.metric!r}, not a metric of the audit; "
             f"choose one of: {', '.join(METRICS)}")
    direction = rule.direction or METRICS[rule.metric].direction
    _require(direction in ("lower", "higher"),
             f"suite field '{path}.direction' must be 'lower' or 'higher' for metric {rule.metric!r}, "
             f"got {rule.direction!r}; state which way is better")
    _require(math.isfinite(rule.tolerance) and rule.tolerance >= 0,
             f"suite field '{path}.tolerance' must be a finite number of at least 0, got {rule.tolerance}")
    _require(0.5 < rule.confidence < 1.0,
             f"suite field '{path}.confidence' must lie strictly between 0.5 and 1, got {rule.confidence}")


def _has_constraint(target: TargetConfig) -> bool:
    return target.type in ("word_list", "pointwise") or bool(target.words) or target.constraint is not None


def _validate_target(target: TargetConfig) -> None:
    """Check the fields that each target type needs and reject those it does not use."""
    _require(0.0 <= target.epsilon < 1.0 and not math.isnan(target.epsilon),
             f"suite field 'target.epsilon' must lie in [0, 1), got {target.epsilon}")
    _require(not (target.words and target.constraint is not None),
             "give either target.words or target.constraint, not both")
    if target.type == "word_list":
        _require(len(target.words) > 0, "suite field 'target.words' must list at least one word")
    if target.type == "pointwise":
        _require(target.constraint is not None, "target type 'pointwise' needs target.constraint (a scorer)")
    if target.type == "distributional":
        _require(len(target.features) > 0, "target type 'distributional' needs target.features")
        for index, feature in enumerate(target.features):
            _require(bool(feature.name.strip()), f"suite field 'target.features[{index}].name' must be set")
            _require(feature.moment is not None and math.isfinite(feature.moment),
                     f"suite field 'target.features[{index}].moment' must be a finite number, got {feature.moment}")
        _require(target.fit_samples >= 2,
                 f"suite field 'target.fit_samples' must be at least 2, got {target.fit_samples}")
    else:
        _require(not target.features, f"target.features applies to type 'distributional' only, not {target.type!r}")
    if target.type == "reward":
        _require(target.reward is not None, "target type 'reward' needs target.reward (a scorer)")
        _require(target.beta is not None and math.isfinite(target.beta) and target.beta > 0,
                 f"suite field 'target.beta' must be a positive number, got {target.beta}; "
                 "the target is pi0(x)*exp(r(x)/beta), so use a value such as 0.1")
    else:
        _require(target.reward is None and target.beta is None,
                 f"target.reward and target.beta apply to type 'reward' only, not {target.type!r}")


def suite_from_dict(data: Any) -> Suite:
    if data is None:
        raise InvalidInputError("the suite file is empty; start from suites/quickstart.yaml")
    if not isinstance(data, dict):
        raise InvalidInputError(f"a suite must be a YAML mapping at the top level, got {type(data).__name__}")
    suite = _build(Suite, data)
    validate_suite(suite)
    return suite


def load_suite(path: str | Path) -> Suite:
    """Load and validate a suite file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"suite file {str(path)!r} not found; pass the path of a YAML suite such as suites/quickstart.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        location = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise InvalidInputError(f"suite file {str(path)!r} is not valid YAML{location}: fix the syntax there") from error
    return suite_from_dict(data)


def known_methods() -> list[str]:
    return sorted([*PRESETS, *DIVERGENCES, "alpha"])

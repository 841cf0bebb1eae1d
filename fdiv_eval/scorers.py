"""Scorers: batched functions from generated texts to one float64 number each.

Features of distributional targets, pointwise constraints and rewards all use
this one interface: ``scorer(texts, prompts)`` returns a float64 array of
shape [B]. ``prompts`` is None for unconditional generation, else one prompt
string per text; only the continuation ``texts[i]`` is scored unless the
scorer itself reads the prompt (a ``module:function`` callable may).

Kinds (``ScorerConfig.type``):

- ``words``: 1.0 when the text contains any listed word (whole word,
  case-insensitive), else 0.0.
- ``regex``: 1.0 when the pattern matches anywhere in the text.
- ``length``: number of words (whitespace-separated) or characters.
- ``vader``: a VADER sentiment score (``compound`` in [−1, 1] by default).
- ``sklearn``: a scikit-learn pipeline on raw texts, saved with skops (a format
  that loads without running code) or, with ``allow_pickle: true`` only,
  with pickle or joblib.
- ``hf_classifier``: a local Hugging Face sequence-classification model; the
  probability or the logit of one label.
- ``callable``: a Python function given as ``module:function``, called with
  ``(texts, prompts)`` or ``(texts)``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from fdiv_eval.errors import InvalidInputError

logger = logging.getLogger(__name__)

SCORER_TYPES = ("words", "regex", "length", "vader", "sklearn", "hf_classifier", "callable")
VADER_FIELDS = ("compound", "pos", "neg", "neu")
LENGTH_UNITS = ("words", "characters")
SKLEARN_OUTPUTS = ("probability", "log_probability", "decision")
CLASSIFIER_OUTPUTS = ("probability", "logit")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")
SKOPS_SUFFIX = ".skops"


class Scorer(Protocol):
    """A batched scorer: texts (and their prompts) in, a float64 array [B] out."""

    def __call__(self, texts: Sequence[str], prompts: Sequence[str] | None = None) -> np.ndarray: ...

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class ScorerConfig:
    """How to score a text. Fields that a ``type`` does not use must stay unset."""

    type: str = ""
    """``words``, ``regex``, ``length``, ``vader``, ``sklearn``, ``hf_classifier`` or ``callable``."""
    words: tuple[str, ...] = ()
    """``words``: the listed words."""
    pattern: str = ""
    """``regex``: a Python regular expression, searched anywhere in the text."""
    ignore_case: bool = True
    """``regex``: match case-insensitively."""
    unit: str = "words"
    """``length``: ``words`` or ``characters``."""
    field: str = "compound"
    """``vader``: ``compound`` (in [−1, 1]), ``pos``, ``neg`` or ``neu``."""
    path: str = ""
    """``sklearn``: the saved pipeline file; ``hf_classifier``: the model folder. Relative paths
    are taken from the suite file's folder."""
    label: str = ""
    """``sklearn`` and ``hf_classifier``: the class whose score is returned."""
    output: str = "probability"
    """``sklearn``: ``probability``, ``log_probability`` or ``decision``; ``hf_classifier``:
    ``probability`` or ``logit``."""
    allow_pickle: bool = False
    """``sklearn``: allow loading a pickle or joblib file. Unpickling runs arbitrary code, so
    set it only for files you trust."""
    function: str = ""
    """``callable``: ``module:function``; the module must be importable (on PYTHONPATH)."""
    batch_size: int = 64
    """``hf_classifier``: texts per forward pass."""
    max_length: int = 512
    """``hf_classifier``: longer texts are truncated to this many tokens."""


def _as_scores(values, count: int, source: str) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64).reshape(-1)
    if scores.size != count:
        raise InvalidInputError(f"scorer {source} returned {scores.size} values for {count} texts; return one per text")
    return scores


class WordScorer:
    """1.0 when the text contains any listed word (whole word, case-insensitive)."""

    def __init__(self, words: Sequence[str]):
        if isinstance(words, str) or not words:
            raise InvalidInputError(f"scorer type 'words' needs a non-empty list in 'words', got {words!r}")
        cleaned = []
        for word in words:
            if not isinstance(word, str) or not word.strip():
                raise InvalidInputError(f"scorer 'words' must be non-empty strings, got {word!r}")
            cleaned.append(word.strip())
        self.words = tuple(cleaned)
        alternatives = "|".join(re.escape(word) for word in sorted(self.words, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def __call__(self, texts, prompts=None) -> np.ndarray:
        return np.fromiter((self._pattern.search(t) is not None for t in texts), dtype=np.float64, count=len(texts))

    def describe(self) -> dict:
        return {"type": "words", "words": list(self.words)}


class RegexScorer:
    """1.0 when the regular expression matches anywhere in the text."""

    def __init__(self, pattern: str, ignore_case: bool = True):
        if not pattern:
            raise InvalidInputError("scorer type 'regex' needs a non-empty 'pattern'")
        try:
            self._pattern = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        except re.error as error:
            raise InvalidInputError(f"scorer pattern {pattern!r} is not a valid regular expression: {error}") from error
        self.pattern = pattern
        self.ignore_case = ignore_case

    def __call__(self, texts, prompts=None) -> np.ndarray:
        return np.fromiter((self._pattern.search(t) is not None for t in texts), dtype=np.float64, count=len(texts))

    def describe(self) -> dict:
        return {"type": "regex", "pattern": self.pattern, "ignore_case": self.ignore_case}


class LengthScorer:
    """Length of the text in whitespace-separated words or in characters."""

    def __init__(self, unit: str = "words"):
        if unit not in LENGTH_UNITS:
            raise InvalidInputError(f"scorer unit {unit!r} is unknown; choose one of: {', '.join(LENGTH_UNITS)}")
        self.unit = unit

    def __call__(self, texts, prompts=None) -> np.ndarray:
        if self.unit == "words":
            return np.array([len(t.split()) for t in texts], dtype=np.float64)
        return np.array([len(t) for t in texts], dtype=np.float64)

    def describe(self) -> dict:
        return {"type": "length", "unit": self.unit}


class VaderScorer:
    """A VADER sentiment score of the text (Hutto and Gilbert, 2014), from ``vaderSentiment``."""

    def __init__(self, field: str = "compound"):
        if field not in VADER_FIELDS:
            raise InvalidInputError(f"vader field {field!r} is unknown; choose one of: {', '.join(VADER_FIELDS)}")
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as error:
            raise InvalidInputError("scorer type 'vader' needs the vaderSentiment package: pip install vaderSentiment") from error
        self.field = field
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts, prompts=None) -> np.ndarray:
        return np.array([self._analyzer.polarity_scores(t)[self.field] for t in texts], dtype=np.float64)

    def describe(self) -> dict:
        return {"type": "vader", "field": self.field}


def _load_skops(path: Path):
    import skops.io

    untrusted = skops.io.get_untrusted_types(file=path)
    # Only scikit-learn's, NumPy's and SciPy's own types are accepted: skops
    # rebuilds those from data without running code from the file.
    foreign = [name for name in untrusted if not name.startswith(("sklearn.", "numpy.", "scipy."))]
    if foreign:
        raise InvalidInputError(
            f"scikit-learn file {str(path)!r} contains types outside scikit-learn, NumPy and SciPy "
            f"({', '.join(foreign)}); save a pipeline of scikit-learn estimators only"
        )
    return skops.io.load(path, trusted=untrusted)


def load_sklearn_model(path: str | Path, allow_pickle: bool = False):
    """Load a scikit-learn estimator from a ``.skops`` file, or a pickle/joblib file when allowed."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"scikit-learn file {str(path)!r} not found; give the path of a saved pipeline")
    if path.suffix == SKOPS_SUFFIX:
        try:
            return _load_skops(path)
        except ImportError as error:
            raise InvalidInputError("loading .skops files needs the skops package: pip install skops") from error
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise InvalidInputError(
                f"scikit-learn file {str(path)!r} is a pickle, and loading it can run arbitrary code: "
                "save it with skops.io.dump as .skops, or set allow_pickle: true in the scorer if you trust the file"
            )
        import joblib

        logger.warning("loading pickled scikit-learn model %s (allow_pickle is set)", path)
        return joblib.load(path)
    raise InvalidInputError(
        f"scikit-learn file {str(path)!r} has an unknown suffix {path.suffix!r}; use .skops "
        f"(or {', '.join(PICKLE_SUFFIXES)} with allow_pickle: true)"
    )


class SklearnScorer:
    """The probability, log-probability or decision value of one class of a scikit-learn pipeline.

    The pipeline takes raw strings (for example a TfidfVectorizer followed by
    a LogisticRegression), so ``predict_proba(texts)`` must work.
    """

    def __init__(self, path: str | Path, label: str, output: str = "probability", allow_pickle: bool = False):
        if output not in SKLEARN_OUTPUTS:
            raise InvalidInputError(
                f"sklearn scorer output {output!r} is unknown; choose one of: {', '.join(SKLEARN_OUTPUTS)}"
            )
        self.path = str(path)
        self.output = output
        self.model = load_sklearn_model(path, allow_pickle)
        classes = [str(c) for c in getattr(self.model, "classes_", [])]
        if not classes:
            raise InvalidInputError(f"scikit-learn model {self.path!r} has no classes_; save a fitted classifier")
        if str(label) not in classes:
            raise InvalidInputError(
                f"label {label!r} not found in scikit-learn model {self.path!r}; available labels: {', '.join(classes)}"
            )
        self.label = str(label)
        self.column = classes.index(self.label)
        self.classes = classes
        if output == "decision" and len(classes) > 2:
            raise InvalidInputError("sklearn output 'decision' supports binary classifiers only; use 'log_probability'")

    def __call__(self, texts, prompts=None) -> np.ndarray:
        texts = list(texts)
        if self.output == "decision":
            decision = np.asarray(self.model.decision_function(texts), dtype=np.float64)
            # For a binary classifier the decision value is positive toward classes_[1].
            return decision if self.column == 1 else -decision
        probabilities = np.asarray(self.model.predict_proba(texts), dtype=np.float64)[:, self.column]
        if self.output == "log_probability":
            with np.errstate(divide="ignore"):
                return np.log(probabilities)
        return probabilities

    def describe(self) -> dict:
        return {"type": "sklearn", "path": self.path, "label": self.label, "output": self.output}


class HFClassifierScorer:
    """The probability (softmax) or logit of one label of a local sequence-classification model."""

    def __init__(self, path: str | Path, label: str, output: str = "probability", batch_size: int = 64,
                 max_length: int = 512):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if output not in CLASSIFIER_OUTPUTS:
            raise InvalidInputError(
                f"hf_classifier output {output!r} is unknown; choose one of: {', '.join(CLASSIFIER_OUTPUTS)}"
            )
        if batch_size < 1:
            raise InvalidInputError(f"hf_classifier batch_size must be at least 1, got {batch_size}")
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise InvalidInputError(
                f"classifier {str(path)!r} not found: expected a local folder with config.json "
                "(a Hugging Face sequence-classification checkpoint)"
            )
        from fdiv_eval.sequences import require_safetensors

        require_safetensors(folder, "classifier")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
            self.model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True,
                                                                            trust_remote_code=False)
        except (OSError, ValueError) as error:
            raise InvalidInputError(f"could not load classifier {str(path)!r}: {error}") from error
        self.model.eval()
        labels = {int(index): str(name) for index, name in self.model.config.id2label.items()}
        matches = [index for index, name in labels.items() if name == str(label)]
        if not matches:
            raise InvalidInputError(
                f"label {label!r} not found in classifier {str(path)!r}; available labels: "
                f"{', '.join(labels[i] for i in sorted(labels))}"
            )
        self.path, self.label, self.output = str(path), str(label), output
        self.index = matches[0]
        self.batch_size, self.max_length = batch_size, max_length
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def __call__(self, texts, prompts=None) -> np.ndarray:
        import torch

        scores = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                chunk = list(texts[start : start + self.batch_size])
                inputs = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                                        max_length=self.max_length)
                logits = self.model(**inputs).logits.double()
                if self.output == "probability":
                    scores.append(torch.softmax(logits, dim=-1)[:, self.index])
                else:
                    scores.append(logits[:, self.index])
        if not scores:
            return np.zeros(0, dtype=np.float64)
        return torch.cat(scores).numpy()

    def describe(self) -> dict:
        return {"type": "hf_classifier", "path": self.path, "label": self.label, "output": self.output}


def import_function(reference: str) -> Callable:
    """Import ``module:function`` (dots allowed after the colon for nested attributes)."""
    module_name, separator, attribute = reference.partition(":")
    if not separator or not module_name or not attribute:
        raise InvalidInputError(f"callable {reference!r} must have the form module:function, for example mypkg.rewards:score")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InvalidInputError(
            f"callable {reference!r}: module {module_name!r} could not be imported ({error}); "
            "install it or add its folder to PYTHONPATH"
        ) from error
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise InvalidInputError(f"callable {reference!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise InvalidInputError(f"callable {reference!r} is not callable")
    return target


class CallableScorer:
    """A user function ``f(texts, prompts)`` or ``f(texts)`` that returns one number per text."""

    def __init__(self, reference: str):
        self.reference = reference
        self.function = import_function(reference)
        try:
            parameters = inspect.signature(self.function).parameters
            self._takes_prompts = len(parameters) >= 2 or any(
                p.kind == inspect.Parameter.VAR_POSITIONAL for p in parameters.values()
            )
        except (TypeError, ValueError):
            self._takes_prompts = False

    def __call__(self, texts, prompts=None) -> np.ndarray:
        texts = list(texts)
        values = self.function(texts, prompts) if self._takes_prompts else self.function(texts)
        scores = _as_scores(values, len(texts), repr(self.reference))
        if np.isnan(scores).any():
            raise InvalidInputError(f"scorer {self.reference!r} returned NaN; return finite numbers")
        return scores

    def describe(self) -> dict:
        return {"type": "callable", "function": self.reference}


def _resolve(path: str, base_dir: Path | None) -> Path:
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and base_dir is not None and (base_dir / candidate).exists():
        return base_dir / candidate
    return candidate


def build_scorer(config: ScorerConfig, base_dir: Path | None = None, where: str = "scorer") -> Scorer:
    """Build the scorer that ``config`` describes; ``where`` names the suite field in errors."""
    kind = config.type
    if kind not in SCORER_TYPES:
        raise InvalidInputError(f"unknown scorer type {kind!r} in {where}; choose one of: {', '.join(SCORER_TYPES)}")
    if kind == "words":
        return WordScorer(config.words)
    if kind == "regex":
        return RegexScorer(config.pattern, config.ignore_case)
    if kind == "length":
        return LengthScorer(config.unit)
    if kind == "vader":
        return VaderScorer(config.field)
    if kind in ("sklearn", "hf_classifier"):
        if not config.path:
            raise InvalidInputError(f"{where}: scorer type {kind!r} needs 'path'")
        if not config.label:
            raise InvalidInputError(f"{where}: scorer type {kind!r} needs 'label', the class to score")
        path = _resolve(config.path, base_dir)
        if kind == "sklearn":
            output = config.output
            return SklearnScorer(path, config.label, output, config.allow_pickle)
        return HFClassifierScorer(path, config.label, config.output, config.batch_size, config.max_length)
    if not config.function:
        raise InvalidInputError(f"{where}: scorer type 'callable' needs 'function' as module:function")
    return CallableScorer(config.function)


def check_finite(scores: np.ndarray, source: str) -> np.ndarray:
    """Raise when a scorer produced NaN or ±∞ (a potential must be finite or exactly −∞)."""
    bad = ~np.isfinite(scores)
    if bad.any():
        value = scores[bad][0]
        raise InvalidInputError(
            f"{source} produced a non-finite score ({value}) for {int(bad.sum())} of {scores.size} texts; "
            "make the scorer return finite numbers"
        )
    return scores


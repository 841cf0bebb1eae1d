"""Train the shipped scikit-learn classifier that predicts which Austen novel a sentence comes from.

The pipeline is a TF-IDF vectorizer over words followed by a multinomial
logistic regression, trained on the sentences of the committed corpus
(``fdiv_eval/data/austen.txt.gz``). Every 5th sentence is held out; the script
prints the held-out accuracy and writes the pipeline with skops (a format that
loads without running code) to ``fdiv_eval/data/novel_classifier.skops``.

Labels: sense_and_sensibility, pride_and_prejudice, mansfield_park, emma,
northanger_abbey, persuasion.

Usage::

    python scripts/train_novel_classifier.py [--output PATH] [--max-features N]
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import skops.io
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fdiv_eval.base_model import corpus_path, split_sentences  # noqa: E402

HOLDOUT_EVERY = 5


def label_of(title: str) -> str:
    """``Sense & Sensibility`` → ``sense_and_sensibility``."""
    return re.sub(r"[^a-z]+", "_", title.lower().replace("&", "and")).strip("_")


def novels(corpus: str) -> dict[str, list[str]]:
    """Split the corpus at its ``# Title`` lines and return label → sentences."""
    parts = re.split(r"^# (.+)$", corpus, flags=re.MULTILINE)
    # re.split with one group returns [preamble, title1, text1, title2, text2, ...].
    return {label_of(title): split_sentences(text) for title, text in zip(parts[1::2], parts[2::2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(corpus_path().parent / "novel_classifier.skops"))
    parser.add_argument("--max-features", type=int, default=1000, help="vocabulary size of the TF-IDF vectorizer")
    args = parser.parse_args()

    with gzip.open(corpus_path(), "rt", encoding="utf-8") as stream:
        by_novel = novels(stream.read())
    texts, labels = [], []
    for label, sentences in by_novel.items():
        texts += sentences
        labels += [label] * len(sentences)
    held_out = np.arange(len(texts)) % HOLDOUT_EVERY == 0
    texts_array, labels_array = np.array(texts, dtype=object), np.array(labels)

    pipeline = make_pipeline(
        TfidfVectorizer(max_features=args.max_features, sublinear_tf=True, dtype=np.float32),
        LogisticRegression(C=4.0, max_iter=2000),
    )
    pipeline.fit(list(texts_array[~held_out]), labels_array[~held_out])
    accuracy = float((pipeline.predict(list(texts_array[held_out])) == labels_array[held_out]).mean())
    majority = max(np.mean(labels_array[held_out] == label) for label in by_novel)

    output = Path(args.output)
    staging = Path(tempfile.mkstemp(prefix=output.name, suffix=".tmp", dir=output.parent)[1])
    skops.io.dump(pipeline, staging, compression=zipfile.ZIP_DEFLATED)
    os.replace(staging, output)
    print(f"{len(texts)} sentences from {len(by_novel)} novels; held-out accuracy {accuracy:.3f} "
          f"on {int(held_out.sum())} sentences (majority class {majority:.3f})")
    print(f"wrote {output} ({output.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()

"""Write the prompts of the conditional suite: the first words of corpus sentences.

Draws ``--count`` sentences of the committed Austen corpus with a fixed seed
and keeps the first ``--words`` words of each as a prompt, one per line, in
``suites/prompts/austen_openings.txt`` (a text file that ``datasets`` reads).

Usage::

    python scripts/build_prompts.py [--count 30] [--words 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fdiv_eval.base_model import corpus_path, split_sentences  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=30, help="number of prompts")
    parser.add_argument("--words", type=int, default=3, help="words per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(ROOT / "suites" / "prompts" / "austen_openings.txt"))
    args = parser.parse_args()

    with gzip.open(corpus_path(), "rt", encoding="utf-8") as stream:
        sentences = split_sentences(stream.read())
    # Openings without quotes or dashes read as plain narration.
    candidates = sorted({" ".join(s.split()[: args.words]) for s in sentences
                         if len(s.split()) > args.words + 3 and s[0].isalpha() and '"' not in s and "-" not in s})
    prompts = random.Random(args.seed).sample(candidates, args.count)

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text("".join(prompt + "\n" for prompt in prompts), encoding="utf-8")
    os.replace(temporary, output)
    print(f"wrote {len(prompts)} prompts to {output}")


if __name__ == "__main__":
    main()

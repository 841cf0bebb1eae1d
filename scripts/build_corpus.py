"""Regenerate ``fdiv_eval/data/austen.txt.gz`` from the Debian package r-cran-janeaustenr.

The package stores Jane Austen's six novels (public domain) as character
vectors, one line of text per element, inside an R lazy-load database
(``data/Rdata.rdx`` indexes ``data/Rdata.rdb``). Each ``.rdb`` entry is a
4-byte big-endian length followed by a zlib stream of an R serialization, which
the ``rdata`` package parses, so R itself is not needed.

Usage (Debian or Ubuntu)::

    apt-get download r-cran-janeaustenr
    dpkg-deb -x r-cran-janeaustenr_*.deb janeaustenr-pkg
    pip install rdata
    python scripts/build_corpus.py janeaustenr-pkg

The output holds one block per novel: a line ``# <title>``, then the novel's
lines with paragraphs separated by blank lines. gzip's header timestamp is
fixed so the file is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import gzip
import io
import sys
import warnings
import zlib
from pathlib import Path

# Order and titles as published; keys are the R object names in the package.
NOVELS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def _parse_r_object(serialized: bytes):
    import rdata

    with warnings.catch_warnings():
        # rdata warns that a bare serialization stream has no RDS header.
        warnings.simplefilter("ignore", UserWarning)
        parsed = rdata.parser.parse_data(serialized)
    return rdata.conversion.convert(parsed)


def read_novels(package_root: Path) -> dict[str, list[str]]:
    """Read every novel's lines from an unpacked r-cran-janeaustenr package."""
    data_dirs = sorted(package_root.rglob("janeaustenr/data"))
    if not data_dirs:
        raise FileNotFoundError(
            f"no janeaustenr/data folder under {package_root}; pass the folder "
            "that `dpkg-deb -x r-cran-janeaustenr_*.deb FOLDER` created"
        )
    data_dir = data_dirs[0]
    index = _parse_r_object(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    database = (data_dir / "Rdata.rdb").read_bytes()

    novels = {}
    for name in NOVELS:
        offset, length = (int(v) for v in index["variables"][name])
        blob = database[offset : offset + length]
        # The first 4 bytes give the uncompressed size; zlib data follows.
        lines = _parse_r_object(zlib.decompress(blob[4:]))
        novels[name] = [str(line) for line in lines]
    return novels


def render_corpus(novels: dict[str, list[str]]) -> str:
    blocks = []
    for name, title in NOVELS.items():
        body = "\n".join(line.rstrip() for line in novels[name]).strip()
        blocks.append(f"# {title}\n\n{body}\n")
    return "\n".join(blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package_root", type=Path, help="folder where the .deb was unpacked")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "fdiv_eval" / "data" / "austen.txt.gz",
    )
    args = parser.parse_args(argv)

    text = render_corpus(read_novels(args.package_root))
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as stream:
        stream.write(text.encode("utf-8"))
    temporary = args.output.with_suffix(".tmp")
    temporary.write_bytes(buffer.getvalue())
    temporary.replace(args.output)
    print(f"wrote {args.output.name}: {len(text):,} characters, {len(buffer.getvalue()):,} bytes gzipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

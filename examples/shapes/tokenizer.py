"""A CLIP-style tokenizer whose whole words are the captions' words.

Each caption word becomes one token; any other text still tokenizes byte by
byte (so a prompt with unknown words runs, and `sdcli generate` can tell which
words the model never saw). Captions are at most 13 words, so 20 positions
(start and end tokens included) leave room without paying for 77.

    python examples/shapes/tokenizer.py --out build/shapes/tokenizer                          # words of the caption grammar
    python examples/shapes/tokenizer.py --out build/shapes/tokenizer --data build/shapes/data  # words of a dataset's captions
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

try:  # imported as examples.shapes.tokenizer or run as a script
    from . import dataset
except ImportError:
    import dataset  # type: ignore[no-redef]

MAX_LENGTH = 20


def words_of(captions) -> list[str]:
    """The distinct words of ``captions`` (lower case, letters only), in order of first appearance."""
    seen: dict[str, None] = {}
    for text in captions:
        for word in re.findall(r"[a-z]+", text.lower()):
            seen.setdefault(word)
    return list(seen)


def dataset_captions(folder: str | Path) -> list[str]:
    """The ``text`` of every row of a dataset folder's metadata.jsonl."""
    meta = Path(folder) / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"no metadata.jsonl in {folder}")
    return [json.loads(line)["text"] for line in meta.read_text().splitlines() if line.strip()]


def build_tokenizer(out: str | Path, words: list[str] | None = None, max_length: int = MAX_LENGTH) -> Path:
    """Write a CLIPTokenizer folder knowing ``words`` (default: every word the caption grammar uses), each one token."""
    from sdcli.testing import write_clip_tokenizer

    return write_clip_tokenizer(out, words or dataset.caption_words(), max_length=max_length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write vocab.json, merges.txt and tokenizer_config.json into")
    parser.add_argument("--data", help="dataset folder whose metadata.jsonl captions give the words (default: the caption grammar)")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="token positions, start and end tokens included")
    args = parser.parse_args(argv)
    # Without a dataset, check against the grammar's longest caption (a corner one: 13 words).
    corner = {"size": "small", "color": "red", "shape": "star", "position": "top left", "background": "black"}
    captions = dataset_captions(args.data) if args.data else [dataset.caption(corner)]
    words = words_of(captions) if args.data else dataset.caption_words()
    longest = max(len(text.split()) for text in captions)
    if longest + 2 > args.max_length:
        parser.error(f"--max-length {args.max_length} cannot hold the longest caption ({longest} words + start and end)")
    out = build_tokenizer(args.out, words, args.max_length)
    print(f"{len(words)} words: {' '.join(words)}", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

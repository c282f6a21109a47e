"""Build a tiny random-weight Stable Diffusion pipeline, offline, to try sdcli without a download.

    python examples/make_tiny_pipeline.py tiny-sd            # SD 1.x layout
    python examples/make_tiny_pipeline.py tiny-xl --family sdxl
    sdcli generate "a red circle" --model tiny-sd

Its images are noise (the weights are random); it proves the plumbing, not the art.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    from sdcli.testing import FAMILIES, save_tiny_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the pipeline to")
    parser.add_argument("--family", choices=FAMILIES, default="sd1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} exists and is not empty", file=sys.stderr)
        return 1
    print(save_tiny_pipeline(args.out, args.family, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What each `--cache` does to a Flux image and its time, on a random Flux transformer on the CPU.

    python benchmarks/cache_bench.py [--width 256] [--layers 4] [--steps 20] [--size 128] [--runs 3]

Builds a random Flux transformer (``--width`` channels, ``--layers`` double and single blocks) in the tiny test
pipeline, loads it once through sdcli's engine, and for each cache mode makes the same image as without a cache,
interleaved with the uncached run (medians of --runs, so drift hits both alike). For each: s/image, the ratio to
the uncached time, and the largest and mean pixel difference from the uncached image. Random weights: the
differences say how far the cache strays on a model whose steps change a lot, not how a trained model looks.
Run by hand; the figures go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

MODES = ("first-block", "first-block:0.2", "taylorseer", "mag")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    from quantize_bench import build

    from sdcli.generation import Engine, Settings

    with tempfile.TemporaryDirectory() as tmp:
        model = str(build(Path(tmp) / "flux", args.width, args.layers))
        engine = Engine.load(Settings(model=model, device="cpu"))

        def image(cache: str | None) -> tuple[np.ndarray, float]:
            t0 = time.perf_counter()
            (made,) = engine.generate("a red circle", seeds=[1], steps=args.steps, width=args.size,
                                      height=args.size, step_cache=cache)
            return np.asarray(made.image, np.int16), time.perf_counter() - t0

        image(None)  # warm-up
        print(f"Flux transformer width {args.width}, {args.layers}+{args.layers} blocks, {args.size}x{args.size}, "
              f"{args.steps} steps, median of {args.runs}")
        print("| --cache | s/image | uncached s/image | time ratio | max pixel diff | mean pixel diff |")
        print("|---|---:|---:|---:|---:|---:|")
        for mode in MODES:
            plain, cached, base = [], [], None
            for _ in range(args.runs):
                base, t = image(None)
                plain.append(t)
                out, t = image(mode)
                cached.append(t)
            p, c = statistics.median(plain), statistics.median(cached)
            diff = np.abs(out - base)
            print(f"| {mode} | {c:.3f} | {p:.3f} | {c / p:.2f} | {diff.max()} | {diff.mean():.2f} |")


if __name__ == "__main__":
    main()

"""What an autoencoder keeps of one shape: the evaluator's reading of its reconstructions, per colour and background.

The held-out score of train_vae.py averages over every image; a small star is one image in eight, so an
autoencoder can read 98 % of held-out shapes right and still blur small green stars on black into blobs.
The UNet draws through the decoder and cannot do better than this table.

    python examples/shapes/probe_vae.py sdcli/models/shapes/vae --shape star --size small

prints one row per background, one column per colour (fresh images at random positions, fixed seed) and
the mean over the pairs.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

try:  # imported as examples.shapes.probe_vae or run as a script
    from . import dataset, train_vae
except ImportError:
    import dataset  # type: ignore[no-redef]
    import train_vae  # type: ignore[no-redef]


def probe(vae, shape: str = "star", size: str = "small", per_pair: int = 40, seed: int = 5) -> dict[tuple[str, str], float]:
    """{(background, colour): share of ``per_pair`` reconstructions the evaluator reads as ``shape``}."""
    rng = random.Random(seed)
    result = {}
    for background in dataset.BACKGROUNDS:
        for colour in dataset.COLORS:
            if colour == background:  # a white shape on white is not drawn
                continue
            rows = [dict(color=colour, shape=shape, size=size, background=background,
                         position=rng.choice(list(dataset.POSITIONS))) for _ in range(per_pair)]
            images = train_vae.to_tensor([dataset.render(attrs, rng) for attrs in rows])
            accuracy = train_vae.reconstruction_accuracy(vae, images, [dataset.caption(attrs) for attrs in rows])
            result[background, colour] = accuracy["shape"]
    return result


def markdown_table(result: dict[tuple[str, str], float]) -> str:
    colours = list(dict.fromkeys(c for _, c in result))
    lines = ["| background | " + " | ".join(colours) + " |", "|---|" + "---:|" * len(colours)]
    for background in dict.fromkeys(b for b, _ in result):
        cells = [f"{100 * result[background, c]:.0f} %" if (background, c) in result else "–" for c in colours]
        lines.append(f"| {background} | " + " | ".join(cells) + " |")
    mean = sum(result.values()) / len(result)
    return "\n".join(lines) + f"\n\nmean over {len(result)} pairs: {100 * mean:.1f} %"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vae", help="an AutoencoderKL folder (train_vae.py's --out, or a pipeline's vae/)")
    parser.add_argument("--shape", choices=dataset.SHAPES, default="star")
    parser.add_argument("--size", choices=list(dataset.SIZES), default="small")
    parser.add_argument("--per-pair", type=int, default=40, help="images per colour and background")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    if not (Path(args.vae) / "config.json").is_file():
        print(f"error: no autoencoder (config.json) in {args.vae}", file=sys.stderr)
        return 1
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    print(markdown_table(probe(vae, args.shape, args.size, args.per_pair)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

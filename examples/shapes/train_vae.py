"""Train the shapes autoencoder: 64x64x3 images <-> 4x16x16 latents, about 0.7 M parameters (2.7 MB).

A diffusers AutoencoderKL with three encoder levels (16, 32, 64 channels,
downsampling twice), trained on MSE with extra weight on the pixels next to an
edge (a small star is 2 % of an image; its outline is what identifies it) plus
a small KL term that keeps the latents smooth. At the end it measures the
latents' spread and stores ``scaling_factor = 1 / std`` in the config, the way
Stable Diffusion's 0.18215 was found, so the UNet sees unit-variance latents.

    python examples/shapes/train_vae.py --data build/shapes/data --out build/shapes/vae --steps 2000

writes the diffusers folder (config.json + diffusion_pytorch_model.safetensors),
training.json (settings, losses, latent statistics) and reconstructions.png
(rows: originals, reconstructions before training, after).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

try:  # imported as examples.shapes.train_vae or run as a script
    from . import dataset, evaluate
except ImportError:
    import dataset  # type: ignore[no-redef]
    import evaluate  # type: ignore[no-redef]

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64],  # (32, 64, 64) reconstructs no better here at twice the step time
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": dataset.SIZE,
}
HELD_OUT = 500  # images kept out of training to measure reconstruction (the last ones of the dataset)


def build_vae(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def to_tensor(images):
    """PIL RGB images as one uint8 tensor (N, 3, 64, 64), the layout training and `reconstruct` take."""
    import numpy as np
    import torch

    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).contiguous()


def load_images(folder: str | Path):
    """A dataset folder's images as one uint8 tensor (N, 3, 64, 64) and their true captions, in metadata.jsonl order."""
    from PIL import Image

    folder = Path(folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    images = [Image.open(folder / row["file_name"]).convert("RGB") for row in rows]
    # True captions, not training ones: they score reconstructions against what is drawn.
    return to_tensor(images), [dataset.true_caption(row) for row in rows]


def generate_images(n: int, seed: int):
    """``n`` dataset images made in memory, as load_images returns them."""
    samples = dataset.make_dataset(n, seed)
    return to_tensor([image for image, _, _ in samples]), [text for _, text, _ in samples]


def to_model(batch):
    return batch.float() / 127.5 - 1.0


def pixel_weights(x, edge_weight: float, shape_weight: float):
    """Per-pixel loss weights for ``x`` (N, 3, H, W in -1..1): 1, plus ``edge_weight`` within a pixel of a
    colour edge, plus ``shape_weight`` on the shape (pixels unlike the border's median colour)."""
    import torch.nn.functional as F

    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(dim=1, keepdim=True)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(dim=1, keepdim=True)
    edges = (F.pad(dx, (0, 1)) + F.pad(dy, (0, 0, 0, 1))) > 0.1
    edges = F.max_pool2d(edges.float(), 3, stride=1, padding=1)  # both sides of the edge
    border = _border(x).median(dim=2).values[..., None, None]  # (N, 3, 1, 1)
    shape = ((x - border).abs().amax(dim=1, keepdim=True) > 0.2).float()
    return 1.0 + edge_weight * edges + shape_weight * shape


def shape_colour_error(recon, x):
    """Squared error between the mean colour of the shape's pixels in ``recon`` and in ``x``, per image, averaged.

    A per-pixel MSE lets the decoder blend a small shape into its background (red turns brown), which costs little
    because the shape is ~4 % of the image; this term asks for the shape's colour as a whole.
    """
    border = _border(x).median(dim=2).values[..., None, None]
    mask = ((x - border).abs().amax(dim=1, keepdim=True) > 0.2).float()
    area = mask.sum(dim=(2, 3)).clamp(min=1.0)
    mean_recon = (recon * mask).sum(dim=(2, 3)) / area
    mean_x = (x * mask).sum(dim=(2, 3)) / area
    return ((mean_recon - mean_x) ** 2).mean()


def _border(x):
    """The 1-pixel frame of each image, as (N, 3, 4 * (side - 1))."""
    import torch

    return torch.cat([x[..., 0, :-1], x[..., :-1, -1], x[..., -1, 1:], x[..., 1:, 0]], dim=2)


def reconstruct(vae, images, batch_size: int = 64):
    """Decoded posterior means of uint8 ``images``, in -1..1, without gradients."""
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = to_model(images[i : i + batch_size])
            outs.append(vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1))
    return torch.cat(outs)


def to_pil(x) -> list:
    """-1..1 image tensors (N, 3, H, W) as PIL images."""
    from PIL import Image

    arrays = ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def reconstruction_accuracy(vae, images, captions) -> dict[str, float]:
    """The evaluator's accuracy on reconstructions: what the VAE lets a perfect UNet score at best."""
    return evaluate.score(zip(to_pil(reconstruct(vae, images)), captions))["accuracy"]


def mse(vae, images) -> float:
    """Reconstruction MSE on the -1..1 scale (divide by 4 for the 0..1 scale)."""
    return float(((reconstruct(vae, images) - to_model(images)) ** 2).mean())


def latent_stats(vae, images, seed: int = 0, batch_size: int = 64) -> dict[str, float]:
    """Mean and std of posterior samples: the latents a diffusion model is trained on."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    zs = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            zs.append(vae.encode(to_model(images[i : i + batch_size])).latent_dist.sample(generator))
    z = torch.cat(zs)
    return {"mean": float(z.mean()), "std": float(z.std()), "abs_max": float(z.abs().max())}


def save_strip(rows, path: Path, scale: int = 2) -> None:
    """Save rows of -1..1 image tensors (each N, 3, H, W) as one PNG grid."""
    import numpy as np
    from PIL import Image

    grid = np.concatenate([np.concatenate(list(r.permute(0, 2, 3, 1).numpy()), axis=1) for r in rows], axis=0)
    image = Image.fromarray(((grid + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(path)


def train(
    out: str | Path,
    images,
    captions: list[str] | None = None,
    steps: int = 2000,
    batch_size: int = 16,
    lr: float = 1e-3,
    kl_weight: float = 1e-4,
    edge_weight: float = 3.0,
    shape_weight: float = 3.0,
    colour_weight: float = 0.0,
    seed: int = 0,
    log_every: int = 50,
    threads: int | None = None,
    held_out: int = HELD_OUT,
    init: str | Path | None = None,
):
    """Train on uint8 ``images`` (N, 3, 64, 64), hold the last ``held_out`` out, save everything to ``out``.

    With ``captions``, the held-out reconstructions are also scored by the evaluator.

    ``threads`` sets torch's (process-wide) thread count; None leaves it alone.
    """
    import torch

    # 1. Setup.
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not 0 < held_out < len(images):
        raise ValueError(f"need more than {held_out} images to hold {held_out} out, got {len(images)}")
    train_images, held_out_images = images[:-held_out], images[-held_out:]
    if init:  # continue from a saved autoencoder (e.g. a shorter run) with a fresh optimiser and schedule
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(init))
    else:
        vae = build_vae(seed)
    show = held_out_images[:8]
    before = reconstruct(vae, show)
    log = [{"step": 0, "held_out_mse": mse(vae, held_out_images)}]
    print(f"step 0: held-out mse {log[0]['held_out_mse']:.4f}", file=sys.stderr)

    # 2. Optimiser: AdamW with a short warmup and cosine decay; small conv nets like a high peak rate.
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(100, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / (warmup + 1) if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))),
    )
    generator = torch.Generator().manual_seed(seed)
    latent_size = VAE_CONFIG["latent_channels"] * (dataset.SIZE // 4) ** 2

    # 3. Loop: reconstruction of a posterior sample, weighted towards edges, plus KL per latent element.
    start = time.time()
    running = {"loss": 0.0, "mse": 0.0, "kl": 0.0}
    for step in range(1, steps + 1):
        index = torch.randint(len(train_images), (batch_size,), generator=generator)
        x = to_model(train_images[index])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        err = (recon - x) ** 2
        kl = posterior.kl().mean() / latent_size
        loss = (pixel_weights(x, edge_weight, shape_weight) * err).mean() + kl_weight * kl
        if colour_weight:
            loss = loss + colour_weight * shape_colour_error(recon, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running["loss"] += loss.item()
        running["mse"] += err.mean().item()
        running["kl"] += kl.item()
        if step % log_every == 0 or step == steps:
            k = log_every if step % log_every == 0 else step % log_every
            entry = {"step": step, **{name: v / k for name, v in running.items()}, "seconds": round(time.time() - start, 1)}
            running = dict.fromkeys(running, 0.0)
            if step % (log_every * 4) == 0 or step == steps:
                entry["held_out_mse"] = mse(vae, held_out_images)
            log.append(entry)
            print(" ".join(f"{name} {v:.4g}" if isinstance(v, float) else f"{name} {v}" for name, v in entry.items()), file=sys.stderr)

    # 4. Scale: the diffusion model should see unit-variance latents.
    stats = latent_stats(vae, train_images[:1024], seed)
    vae.register_to_config(scaling_factor=1.0 / stats["std"])
    vae.save_pretrained(str(out), safe_serialization=True)
    save_strip([to_model(show), before, reconstruct(vae, show)], out / "reconstructions.png")
    record = {
        "script": "examples/shapes/train_vae.py",
        "settings": {"steps": steps, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight,
                     "edge_weight": edge_weight, "shape_weight": shape_weight, "colour_weight": colour_weight, "init": str(init) if init else None, "seed": seed, "threads": torch.get_num_threads(), "train_images": len(train_images),
                     "held_out_images": held_out},
        "vae_config": VAE_CONFIG,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "latents": stats,
        "scaling_factor": 1.0 / stats["std"],
        "held_out_mse_before": log[0]["held_out_mse"],
        "held_out_mse_after": log[-1]["held_out_mse"],
        "held_out_reconstruction_accuracy": (
            reconstruction_accuracy(vae, held_out_images, captions[-held_out:]) if captions else None
        ),
        "seconds": round(time.time() - start, 1),
        "log": log,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return vae, record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the trained AutoencoderKL (diffusers layout)")
    parser.add_argument("--data", help="dataset folder from dataset.py (default: generate --n images in memory)")
    parser.add_argument("--n", type=int, default=5000, help="images to generate when --data is not given")
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps (~0.5 s each on one core)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, cosine decay)")
    parser.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the KL term per latent element")
    parser.add_argument("--edge-weight", type=float, default=3.0, help="extra loss weight on pixels next to an edge")
    parser.add_argument("--shape-weight", type=float, default=3.0, help="extra loss weight on the shape's pixels")
    parser.add_argument("--colour-weight", type=float, default=0.0,
                        help="weight of the squared error of the shape's mean colour, per image (0: off)")
    parser.add_argument("--init", help="start from this saved autoencoder instead of random weights")
    parser.add_argument("--seed", type=int, default=0, help="seed for initial weights, batches and data")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine; 0: torch's default)")
    parser.add_argument("--held-out", type=int, default=HELD_OUT,
                        help="images kept out of training, at the end of the dataset, to score reconstructions on")
    args = parser.parse_args(argv)
    images, captions = load_images(args.data) if args.data else generate_images(args.n, args.seed)
    _, record = train(args.out, images, captions, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      kl_weight=args.kl_weight, edge_weight=args.edge_weight, shape_weight=args.shape_weight,
                      colour_weight=args.colour_weight, init=args.init,
                      seed=args.seed, threads=args.threads, held_out=args.held_out)
    accuracy = ", ".join(f"{k} {v:.0%}" for k, v in record["held_out_reconstruction_accuracy"].items())
    print(f"held-out mse {record['held_out_mse_before']:.4f} -> {record['held_out_mse_after']:.4f}, "
          f"scaling_factor {record['scaling_factor']:.4f}, {record['seconds']} s; evaluator on reconstructions: {accuracy}",
          file=sys.stderr)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Latents and text conditioning for a batch, computed live or looked up in a cache.

The VAE is never trained and the text encoder only with --train-text-encoder,
so their outputs for a given image (and its mirror image) or caption never
change: `TrainingInputs.build_cache` computes them once and a step then costs
one denoiser (UNet or transformer) forward and backward. The cache keeps the
VAE's latent distribution (mean and std), not one sample of it, so each step
still draws a fresh latent exactly as the live path does; with the same generator both paths give the
same batch (a test holds them to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sdcli import defaults
from sdcli.latents import scale
from sdcli.training.data import Example, Item, load_rgb, to_pixels
from sdcli.training.families import TrainingFamily


@dataclass
class Batch:
    latents: Any  # (B, C, h, w), already scaled for the denoiser (`sdcli.latents.scale`)
    cond: dict[str, Any]  # keyword arguments for the denoiser besides the latents and the timestep


class TextEncoding:
    """Prompts to the denoiser's text conditioning, the way the pipeline itself encodes them.

    What each family does is in `sdcli.training.families` (SD3 and Flux through their pipeline's own
    `encode_prompt`); this class adds the null prompt and lets training swap in prepared encoders.
    """

    def __init__(self, pipe: Any, device: Any, family: TrainingFamily):
        self.pipe = pipe
        self.device = device
        self.family = family
        self.pairs = family.encoders(pipe)
        # SDXL pipelines with force_zeros_for_empty_prompt use all-zero embeddings as the
        # unconditional branch when no negative prompt is given (as `sdcli generate` does):
        # the null prompt must train that same conditioning. SD3's and Flux's pipelines encode the
        # empty prompt instead, which the plain path already does.
        self.zero_null = family.zeros_for_empty_prompt and bool(pipe.config.get("force_zeros_for_empty_prompt", False))

    @property
    def encoders(self) -> list[Any]:
        return [enc for _, enc in self.pairs]

    def use(self, encoders: list[Any]) -> None:
        """Encode through these (accelerate-prepared) modules: DDP only syncs gradients through its wrapper."""
        self.pairs = [(tok, enc) for (tok, _), enc in zip(self.pairs, encoders)]

    def encode(self, prompts: list[str]):
        """(hidden states (B, L, D), pooled (B, D') or None, as the family has it)."""
        hidden, pooled = self.family.encode(self.pipe, self.pairs, prompts, self.device)
        if self.zero_null:
            keep = [p != defaults.NULL_PROMPT for p in prompts]
            import torch

            mask = torch.tensor(keep, device=hidden.device, dtype=hidden.dtype)
            hidden = hidden * mask[:, None, None]
            pooled = pooled * mask[:, None]
        return hidden, pooled


class TrainingInputs:
    """Turns a list of `Item`s into a `Batch`, from the cache where there is one."""

    def __init__(
        self,
        pipe: Any,
        examples: list[Example],
        *,
        family: TrainingFamily | None = None,  # default: the pipeline's own
        resolution: int,
        center_crop: bool,
        device: Any,
        cache_latents: bool,
        cache_text: bool,
    ):
        self.vae = pipe.vae
        if family is None:
            from sdcli.pipeline import family_of as pipeline_family
            from sdcli.training.families import family_of

            family = family_of(pipe, pipeline_family(pipe))
        self.text = TextEncoding(pipe, device, family)
        self.examples = examples
        self.resolution = resolution
        self.center_crop = center_crop
        self.device = device
        self.cache_latents = cache_latents
        self.cache_text = cache_text
        # Filled by build_cache: moments[i, flipped] and prompt ids, on the CPU.
        self.mean = self.std = self.time_ids = None
        self.prompts: list[str] = []
        self.prompt_index: list[int] = []
        self.hidden = self.pooled = None

    # 1. The cache -----------------------------------------------------------

    def build_cache(self, flip: bool, batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> None:
        """Encode every image (and its mirror image if ``flip``) and every caption once."""
        import torch

        n = len(self.examples)
        variants = (False, True) if flip else (False,)
        if self.cache_text:
            # The null prompt first, so a dropped caption is index 0 whatever the captions are.
            self.prompts, self.prompt_index, seen = [defaults.NULL_PROMPT], [], {defaults.NULL_PROMPT: 0}
            for ex in self.examples:
                caption = ex.caption if ex.caption is not None else defaults.NULL_PROMPT
                if caption not in seen:
                    seen[caption] = len(self.prompts)
                    self.prompts.append(caption)
                self.prompt_index.append(seen[caption])
        total = (n * len(variants) if self.cache_latents else 0) + (len(self.prompts) if self.cache_text else 0)
        done = 0
        with torch.no_grad():
            if self.cache_latents:
                means, stds, times = [], [], []
                for start in range(0, n, batch_size):
                    count = min(batch_size, n - start)
                    moments = []
                    for mirrored in variants:
                        pixels, time_ids = self._pixels([Item(start + j, flip=mirrored) for j in range(count)])
                        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
                        moments.append((dist.mean.float().cpu(), dist.std.float().cpu(), time_ids))
                        done += count
                        if progress:
                            progress(done, total)
                    means.append(torch.stack([m[0] for m in moments], dim=1))
                    stds.append(torch.stack([m[1] for m in moments], dim=1))
                    times.append(torch.stack([m[2] for m in moments], dim=1))
                self.mean, self.std, self.time_ids = torch.cat(means), torch.cat(stds), torch.cat(times)
            if self.cache_text:
                hidden, pooled = [], []
                for start in range(0, len(self.prompts), batch_size):
                    chunk = self.prompts[start:start + batch_size]
                    h, p = self.text.encode(chunk)
                    hidden.append(h.float().cpu())
                    if p is not None:
                        pooled.append(p.float().cpu())
                    done += len(chunk)
                    if progress:
                        progress(done, total)
                self.hidden = torch.cat(hidden)
                self.pooled = torch.cat(pooled) if pooled else None

    # 2. A batch -------------------------------------------------------------

    def batch(self, items: list[Item], generator) -> Batch:
        """Latents sampled with ``generator`` and the conditioning for ``items``."""
        import torch

        idx = torch.tensor([it.index for it in items])
        if self.cache_latents:
            flipped = torch.tensor([int(it.flip) for it in items])
            mean = self.mean[idx, flipped].to(self.device)
            std = self.std[idx, flipped].to(self.device)
            time_ids = self.time_ids[idx, flipped]
        else:
            pixels, time_ids = self._pixels(items)
            with torch.no_grad():
                dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
        # A fresh draw from the latent distribution, as latent_dist.sample() would, scaled for the denoiser.
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        latents = scale(self.vae, mean + std * eps)
        hidden, pooled = self._text(items)
        cond = self.text.family.conditioning(hidden, pooled, time_ids.to(self.device, hidden.dtype))
        return Batch(latents=latents, cond=cond)

    def _text(self, items: list[Item]):
        import torch

        if self.cache_text:
            ids = torch.tensor([0 if it.drop else self.prompt_index[it.index] for it in items])
            hidden = self.hidden[ids].to(self.device)
            pooled = self.pooled[ids].to(self.device) if self.pooled is not None else None
        else:
            prompts = [self.prompt_of(it) for it in items]
            trained = any(p.requires_grad for enc in self.text.encoders for p in enc.parameters())
            with torch.set_grad_enabled(trained and torch.is_grad_enabled()):
                hidden, pooled = self.text.encode(prompts)
        return hidden, pooled

    def prompt_of(self, item: Item) -> str:
        """The caption this item trains on: its own, or the null prompt when dropped or missing."""
        caption = self.examples[item.index].caption
        return defaults.NULL_PROMPT if item.drop or caption is None else caption

    def _pixels(self, items: list[Item]):
        """Pixels (B, 3, res, res) and SDXL micro-conditioning (B, 6) for ``items``."""
        import torch

        pixels, time_ids = [], []
        for it in items:
            image = load_rgb(self.examples[it.index].path)
            px, (top, left) = to_pixels(image, self.resolution, self.center_crop, it.flip, it.crop)
            pixels.append(px)
            # (original h, w, crop top, crop left, target h, w), as SDXL was trained.
            time_ids.append(torch.tensor([image.height, image.width, top, left, self.resolution, self.resolution],
                                         dtype=torch.float32))
        return torch.stack(pixels), torch.stack(time_ids)

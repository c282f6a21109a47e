"""Latents and text conditioning for a batch, computed live or looked up in a cache.

The VAE is never trained and the text encoder only with --train-text-encoder,
so their outputs for a given image (and its mirror image) or caption never
change: `TrainingInputs.build_cache` computes them once and a step then costs
one denoiser (UNet or transformer) forward and backward. The cache keeps the
VAE's latent distribution (mean and std), not one sample of it, so each step
still draws a fresh latent exactly as the live path does; with the same generator both paths give the
same batch (a test holds them to it). With aspect-ratio buckets the examples' latents differ in shape,
so the cache holds one tensor per example, encoded a bucket at a time; a batch (one bucket) stacks them.

With --shuffle-captions the text is encoded every step instead of cached: a caption's tags come in a
new order each time (ten tags have 3.6 million orders), so a cache of the orders met would grow by
nearly one entry a step and almost never be read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sdcli.training.data import Example, Item, latent_weights, load_mask, load_rgb, shuffle_tags, to_mask, to_pixels


@dataclass
class Batch:
    latents: Any  # (B, C, h, w), already scaled for the denoiser (`sdcli.latents.scale`)
    cond: dict[str, Any]  # keyword arguments for the denoiser besides the latents and the timestep
    weights: Any = None  # (B, 1, h, w) per-latent-pixel loss weights from the loss masks; None: no masks


class TextEncoding:
    """Prompts to the denoiser's text conditioning, the way the pipeline itself encodes them.

    What each family does is in its `sdcli.families` module (SD3 and Flux through their pipeline's own
    `encode_prompt`); this class adds the null prompt and lets training swap in prepared encoders.
    """

    def __init__(self, pipe: Any, device: Any, family: Any):  # sdcli.families.Family
        self.pipe = pipe
        self.device = device
        self.family = family
        self.pairs = family.encoders(pipe)
        # SDXL pipelines with force_zeros_for_empty_prompt use all-zero embeddings as the
        # unconditional branch when no negative prompt is given (as `sdcli generate` does):
        # the null prompt must train that same conditioning. SD3's and Flux's pipelines encode the
        # empty prompt instead, which the plain path already does (Qwen-Image's its model card's " ").
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
            keep = [p != self.family.null_prompt for p in prompts]
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
        family: Any = None,  # sdcli.families.Family; default: the pipeline's own
        resolution: int | None = None,  # a square of this side for every example, unless ``sizes``
        sizes: list[tuple[int, int]] | None = None,  # (w, h) per example: its bucket
        center_crop: bool,
        device: Any,
        cache_latents: bool,
        cache_text: bool,
        shuffle_captions: bool = False,
        keep_tokens: int = 0,
        unmasked_weight: float = 0.0,  # the loss weight where a loss mask is black (`data.latent_weights`)
    ):
        self.vae = pipe.vae
        if family is None:
            from sdcli.families import training_family

            family = training_family(pipe)
        self.text = TextEncoding(pipe, device, family)
        self.examples = examples
        self.sizes = list(sizes) if sizes is not None else [(resolution, resolution)] * len(examples)
        self.center_crop = center_crop
        self.device = device
        self.cache_latents = cache_latents
        self.cache_text = cache_text and not shuffle_captions
        self.shuffle_captions, self.keep_tokens = shuffle_captions, keep_tokens
        self.masked = any(ex.mask is not None for ex in examples)
        self.unmasked_weight = unmasked_weight
        # Filled by build_cache, on the CPU: per example, its latent moments [flipped] (C, h, w), SDXL
        # micro-conditioning [flipped] (6,) and loss weights [flipped] (1, h, w); prompt ids.
        self.weights: list[Any] | None = None
        self.mean: list[Any] | None = None
        self.std: list[Any] | None = None
        self.time_ids: list[Any] | None = None
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
            null = self.text.family.null_prompt
            self.prompts, self.prompt_index, seen = [null], [], {null: 0}
            for ex in self.examples:
                ids = []
                for caption in ex.captions or [ex.caption if ex.caption is not None else null]:
                    if caption not in seen:
                        seen[caption] = len(self.prompts)
                        self.prompts.append(caption)
                    ids.append(seen[caption])
                # One id, or with --captions-from one per caption of the image (the step's draw picks one).
                self.prompt_index.append(ids[0] if len(ids) == 1 else ids)
        total = (n * len(variants) if self.cache_latents else 0) + (len(self.prompts) if self.cache_text else 0)
        done = 0
        with torch.no_grad():
            if self.cache_latents:
                self.mean, self.std, self.time_ids, self.weights = [None] * n, [None] * n, [None] * n, [None] * n
                # One bucket at a time: a VAE batch is one tensor, so its images must share a size.
                by_size: dict[tuple[int, int], list[int]] = {}
                for index, size in enumerate(self.sizes):
                    by_size.setdefault(size, []).append(index)
                for members in by_size.values():
                    for start in range(0, len(members), batch_size):
                        chunk = members[start:start + batch_size]
                        moments = []
                        for mirrored in variants:
                            pixels, time_ids, masks = self._pixels([Item(i, flip=mirrored) for i in chunk])
                            mean, std = self.text.family.posterior(self.vae, pixels.to(self.device, self.vae.dtype))
                            weights = (latent_weights(masks, mean.shape[-2:], self.unmasked_weight)
                                       if masks is not None else None)
                            moments.append((mean.float().cpu(), std.float().cpu(), time_ids, weights))
                            done += len(chunk)
                            if progress:
                                progress(done, total)
                        for j, index in enumerate(chunk):
                            self.mean[index] = torch.stack([m[0][j] for m in moments])
                            self.std[index] = torch.stack([m[1][j] for m in moments])
                            self.time_ids[index] = torch.stack([m[2][j] for m in moments])
                            if self.masked:
                                self.weights[index] = torch.stack([m[3][j] for m in moments])
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
                if self.text.family.text_mask:  # prompts of different lengths: each chunk padded to the longest
                    hidden, pooled = _pad_tokens(hidden), _pad_tokens(pooled)
                self.hidden = torch.cat(hidden)
                self.pooled = torch.cat(pooled) if pooled else None

    # 2. A batch -------------------------------------------------------------

    def batch(self, items: list[Item], generator) -> Batch:
        """Latents sampled with ``generator`` and the conditioning for ``items``."""
        import torch

        if self.cache_latents:
            mean = torch.stack([self.mean[it.index][int(it.flip)] for it in items]).to(self.device)
            std = torch.stack([self.std[it.index][int(it.flip)] for it in items]).to(self.device)
            time_ids = torch.stack([self.time_ids[it.index][int(it.flip)] for it in items])
            weights = (torch.stack([self.weights[it.index][int(it.flip)] for it in items]).to(self.device)
                       if self.masked else None)
        else:
            pixels, time_ids, masks = self._pixels(items)
            with torch.no_grad():
                mean, std = self.text.family.posterior(self.vae, pixels.to(self.device, self.vae.dtype))
            mean, std = mean.float(), std.float()
            weights = (latent_weights(masks, mean.shape[-2:], self.unmasked_weight).to(self.device)
                       if masks is not None else None)
        # A fresh draw from the latent distribution, as latent_dist.sample() would, scaled for the denoiser.
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        latents = self.text.family.scale_latents(self.vae, mean + std * eps)
        hidden, pooled = self._text(items)
        cond = self.text.family.conditioning(hidden, pooled, time_ids.to(self.device, hidden.dtype))
        return Batch(latents=latents, cond=cond, weights=weights)

    def _text(self, items: list[Item]):
        import torch

        if self.cache_text:
            ids = torch.tensor([0 if it.drop else _picked(self.prompt_index[it.index], it) for it in items])
            hidden = self.hidden[ids].to(self.device)
            pooled = self.pooled[ids].to(self.device) if self.pooled is not None else None
        else:
            prompts = [self.prompt_of(it) for it in items]
            trained = any(p.requires_grad for enc in self.text.encoders for p in enc.parameters())
            with torch.set_grad_enabled(trained and torch.is_grad_enabled()):
                hidden, pooled = self.text.encode(prompts)
        return hidden, pooled

    def prompt_of(self, item: Item) -> str:
        """The caption this item trains on: its own (its tags in the item's order with --shuffle-captions),
        or the null prompt when dropped or missing."""
        example = self.examples[item.index]
        caption = _picked(example.captions, item) if example.captions else example.caption
        if item.drop or caption is None:
            return self.text.family.null_prompt
        if self.shuffle_captions and item.tags is not None:
            return shuffle_tags(caption, self.keep_tokens, item.tags)
        return caption

    def _pixels(self, items: list[Item]):
        """Pixels (B, 3, h, w), SDXL micro-conditioning (B, 6) and, when any example has a loss mask, the masks
        (B, 1, h, w; all ones for one without) cropped and mirrored as the pixels are, for ``items``, which
        share one size."""
        import torch

        pixels, time_ids, masks = [], [], []
        for it in items:
            example = self.examples[it.index]
            image = load_rgb(example.path)
            w, h = self.sizes[it.index]
            px, (top, left) = to_pixels(image, (w, h), self.center_crop, it.flip, it.crop)
            pixels.append(px)
            if self.masked:
                masks.append(to_mask(load_mask(example.mask, example.alpha), image.size, (w, h), self.center_crop,
                                     it.flip, it.crop) if example.mask is not None else torch.ones(1, h, w))
            # (original h, w, crop top, crop left, target h, w), as SDXL was trained: the image's real size and
            # where in it (resized to cover the bucket) the crop sits.
            time_ids.append(torch.tensor([image.height, image.width, top, left, h, w], dtype=torch.float32))
        return torch.stack(pixels), torch.stack(time_ids), (torch.stack(masks) if masks else None)


def _pad_tokens(chunks: list[Any]) -> list[Any]:
    """Chunks of token embeddings (B, L, D) or token masks (B, L) padded with zeros to the longest L: masked
    tokens, which the family's denoiser call ignores."""
    import torch.nn.functional as F

    longest = max(c.shape[1] for c in chunks)
    return [F.pad(c, (0, 0) * (c.ndim - 2) + (0, longest - c.shape[1])) for c in chunks]


def _picked(options, item: Item):
    """The one of an image's several captions (or their cache ids) ``item`` trains on; a single one as it is."""
    if not isinstance(options, list):
        return options
    return options[(item.pick or 0) % len(options)]

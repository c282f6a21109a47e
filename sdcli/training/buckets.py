"""Aspect-ratio buckets: each image trains at about the model's area, in the shape nearest its own.

A square crop cuts the head and feet off a portrait. Buckets (NovelAI's 2022 recipe, which kohya's
sd-scripts made common) offer sizes of at most the model's native area, resolution², whose sides are
multiples of the model's latent granularity (64 px for Stable Diffusion: the VAE's 8× times the UNet's
three halvings), in both orientations, between a shortest and a longest side. Each image goes to the
size whose aspect ratio is nearest its own, measured as the distance of log(w/h), so 2:1 and 1:2 are
equally far from square; it is resized to cover that size and cropped. Every batch holds one bucket,
so a batch is still one tensor (`sdcli.training.data.epoch_batches`).

With upscaling off, an image smaller than its bucket gets a bucket of its own size instead (scaled
down to the area, sides floored to the granularity), and one too small for even the shortest side is
skipped. Everything here is a pure function of the images' sizes and the settings, so every process
and every resumed run lays the data out the same way.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

from sdcli.errors import DataError
from sdcli.training.data import DataReport

Size = tuple[int, int]  # (width, height) in pixels


def bucket_sizes(resolution: int, step: int, min_side: int, max_side: int) -> list[Size]:
    """Every bucket on offer: for each width from ``min_side`` to ``max_side`` in steps of ``step``, the
    tallest height in steps (at most ``max_side``) that keeps the area within resolution²; the same sizes
    turned on their side; and the native square."""
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def aspect_error(image: Size, bucket: Size) -> float:
    """How far apart two aspect ratios are: |log(w/h) − log(w'/h')|, the same for a too-wide and a too-tall
    image; e^error − 1 is how much wider (or taller) than its bucket the image is."""
    return abs(math.log(image[0] / image[1]) - math.log(bucket[0] / bucket[1]))


def nearest(sizes: list[Size], image: Size) -> Size:
    """The bucket whose aspect ratio is nearest the image's (the larger on a tie, then the first)."""
    return min(sizes, key=lambda b: (aspect_error(image, b), -b[0] * b[1]))


def own_size(image: Size, resolution: int, step: int, max_side: int) -> Size:
    """The largest bucket inside the image: its size scaled down to resolution² if larger, each side floored
    to a step (and to ``max_side``), so the image is never enlarged."""
    w, h = image
    scale = min(1.0, math.sqrt(resolution * resolution / (w * h)))
    return min(max_side, int(w * scale) // step * step), min(max_side, int(h * scale) // step * step)


@dataclass
class Layout:
    """Which size each example trains at, and the epoch's groups of same-size samples."""

    sizes: list[Size]  # per example, in the report's order
    repeats: list[int]  # per example: times it counts in an epoch
    errors: list[float]  # per example: `aspect_error` to its size
    offered: list[Size]  # the buckets on offer (a one-size list without buckets)
    enabled: bool
    resolution: int
    step: int
    min_side: int
    max_side: int
    upscale: bool
    upscaled: int = 0  # examples enlarged to cover their size
    own: int = 0  # examples with a bucket of their own size (--no-upscale)
    resolutions: tuple[int, ...] = ()  # several --resolution sizes: each example is laid out once at each

    def groups(self) -> list[list[int]]:
        """Example indices by size (sizes in sorted order), each listed as often as it repeats."""
        by_size: dict[Size, list[int]] = defaultdict(list)
        for index, (size, repeats) in enumerate(zip(self.sizes, self.repeats)):
            by_size[size] += [index] * repeats
        return [by_size[size] for size in sorted(by_size)]

    def table(self) -> list[dict[str, Any]]:
        """One row per size in use: its images, samples an epoch, and mean aspect error (e^error − 1)."""
        rows: dict[Size, list[int]] = defaultdict(list)
        for index, size in enumerate(self.sizes):
            rows[size].append(index)
        return [{"size": list(size), "images": len(members), "per_epoch": sum(self.repeats[i] for i in members),
                 "mean_aspect_error": round(sum(math.expm1(self.errors[i]) for i in members) / len(members), 4)}
                for size, members in sorted(rows.items())]

    def lines(self) -> list[str]:
        """The bucket table as printed before training."""
        rows = self.table()
        if not self.enabled:
            return [f"buckets: off, every image cropped to {self.resolution}x{self.resolution}"]
        own = f", {self.own} of their own size (--no-upscale)" if self.own else ""
        areas = ", ".join(f"{r}x{r}" for r in (self.resolutions or (self.resolution,)))
        each = " each image at" if self.resolutions else ""
        out = [f"buckets: {len(rows)} sizes in use of {len(self.offered)} offered{own} ({each}area up to "
               f"{areas}, sides {self.min_side}-{self.max_side} in steps of {self.step})",
               f"  {'size':>9}  {'images':>6}  {'per epoch':>9}  mean aspect error"]
        for row in rows:
            w, h = row["size"]
            out.append(f"  {f'{w}x{h}':>9}  {row['images']:>6}  {row['per_epoch']:>9}  "
                       f"{row['mean_aspect_error'] * 100:.1f}%")
        if self.upscaled:
            out.append(f"  {self.upscaled} smaller than their bucket will be upscaled (--no-upscale keeps them small)")
        return out

    def record(self) -> dict[str, Any]:
        """What training_settings.json keeps."""
        return {"enabled": self.enabled, "resolution": list(self.resolutions) or self.resolution, "step": self.step,
                "min_side": self.min_side, "max_side": self.max_side, "upscale": self.upscale,
                "offered": [list(s) for s in self.offered], "table": self.table()}


def assign(report: DataReport, resolution: int, step: int, min_side: int | None = None, max_side: int | None = None,
           *, enabled: bool = True, upscale: bool = True, strict: bool = False,
           warn: Callable[[str], None] | None = None) -> Layout:
    """Lay out ``report``'s examples: a bucket each (or the square ``resolution`` when not ``enabled``).

    Without ``upscale``, an example too small for the shortest side is dropped from ``report`` with a
    warning (a DataError with ``strict``, as an unreadable image is); none left is a DataError.
    """
    min_side = resolution if min_side is None else min_side
    max_side = resolution if max_side is None else max_side
    offered = bucket_sizes(resolution, step, min_side, max_side) if enabled else [(resolution, resolution)]
    chosen: list[tuple[Any, Size, bool]] = []
    for example in list(report.examples):
        size = nearest(offered, example.size)
        own = not upscale and (example.size[0] < size[0] or example.size[1] < size[1])
        if own:
            size = own_size(example.size, resolution, step, max_side)
            if min(size) < min_side:
                w, h = example.size
                why = (f"{w}x{h} is smaller than the smallest bucket ({min_side} px a side) and --no-upscale "
                       "keeps it from being enlarged")
                if strict:
                    raise DataError(f"{report.name(example.path)}: {why}")
                report.skip(example, why)
                if warn:
                    warn(f"warning: skipping {report.name(example.path)}: {why}")
                continue
        chosen.append((example, size, own))
    if not chosen:
        raise DataError(f"no image in --data is large enough for a bucket with --no-upscale (the shortest side is "
                        f"{min_side} px); lower --min-bucket or allow upscaling")
    sizes = [size for _, size, _ in chosen]
    return Layout(
        sizes=sizes, repeats=[ex.repeats for ex, _, _ in chosen],
        errors=[aspect_error(ex.size, size) for ex, size, _ in chosen], offered=offered, enabled=enabled,
        resolution=resolution, step=step, min_side=min_side, max_side=max_side, upscale=upscale,
        upscaled=sum(1 for ex, (w, h), _ in chosen if w > ex.size[0] or h > ex.size[1]),
        own=sum(1 for _, _, own in chosen if own),
    )


def assign_each(report: DataReport, resolutions: tuple[int, ...], step: int, min_side: int | None = None,
                max_side: int | None = None, *, enabled: bool = True, upscale: bool = True, strict: bool = False,
                warn: Callable[[str], None] | None = None) -> tuple[Layout, list[Any]]:
    """(the layout, the examples it lays out) at each of several ``resolutions`` (ai-toolkit's
    ``resolution: [512, 768, 1024]``): every example once at each size, in its bucket there, so an epoch sees
    each image at each size; each batch is still one bucket (`data.epoch_batches`). One size: `assign`."""
    if len(resolutions) == 1:
        return assign(report, resolutions[0], step, min_side, max_side, enabled=enabled, upscale=upscale,
                      strict=strict, warn=warn), report.examples
    layouts = [assign(report, r, step, min_side, max_side, enabled=enabled, upscale=upscale, strict=strict,
                      warn=warn) for r in resolutions]  # upscaling on (config.check): no example is dropped
    first = layouts[0]
    combined = Layout(
        sizes=[s for lay in layouts for s in lay.sizes], repeats=[n for lay in layouts for n in lay.repeats],
        errors=[e for lay in layouts for e in lay.errors], offered=sorted({s for lay in layouts for s in lay.offered}),
        enabled=enabled, resolution=max(resolutions), step=step, min_side=first.min_side, max_side=first.max_side,
        upscale=upscale, upscaled=sum(lay.upscaled for lay in layouts), resolutions=tuple(resolutions))
    return combined, report.examples * len(resolutions)

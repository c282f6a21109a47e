"""The VAE's latent space as the UNet sees it, scaled and shifted the way diffusers pipelines do.

A VAE's raw latents z have a spread far from the unit variance the UNet was
trained on; every pipeline multiplies by the VAE's ``scaling_factor`` (0.18215
for SD 1/2, 0.13025 for SDXL) and, for VAEs that have one (SD3, Flux), first
subtracts its ``shift_factor``:

    latent = (z − shift) · scale        z = latent / scale + shift

Generation (trajectory frames), training and `inspect-schedule` all go through
here, so the two factors are read in one place. torch is imported inside.
"""

from __future__ import annotations

from typing import Any


def latent_scale(vae: Any) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of ``vae``; the shift is 0 for VAEs without one, the scale 1 for VAEs
    without one (FLUX.2's, whose pipeline normalises latents by the VAE's batch-norm statistics instead)."""
    config = vae.config
    return float(getattr(config, "scaling_factor", None) or 1.0), float(getattr(config, "shift_factor", None) or 0.0)


def scale(vae: Any, z: Any) -> Any:
    """Raw VAE latents → the latents the UNet works on."""
    factor, shift = latent_scale(vae)
    return (z - shift) * factor


def unscale(vae: Any, latents: Any) -> Any:
    """The UNet's latents → raw VAE latents, ready for ``vae.decode``."""
    factor, shift = latent_scale(vae)
    return latents / factor + shift


def encode(vae: Any, pixels: Any, *, sample: bool = False, generator: Any = None) -> Any:
    """Pixels (B, 3, H, W) in [−1, 1] → UNet latents on the VAE's device.

    The posterior mean by default (deterministic, what a picture "is" in latent
    space); with ``sample`` one draw from the posterior, as training uses.
    """
    import torch

    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return scale(vae, dist.sample(generator) if sample else dist.mean)


def decode(vae: Any, latents: Any) -> Any:
    """UNet latents → pixels (B, 3, H, W) in about [−1, 1], unclamped, in the VAE's dtype and on its device."""
    import torch

    with torch.no_grad():
        return vae.decode(unscale(vae, latents.to(vae.device, vae.dtype)), return_dict=False)[0]

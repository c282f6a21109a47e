"""The maths of one training step, as small functions named after their papers.

DDPM models (SD 1/2, SDXL): the forward process is the scheduler's own
(`add_noise`, `get_velocity`); we never re-derive it here, only choose what to
regress and how to weight it. Flow-matching models (SD3, Flux): σ and the
timestep come from the scheduler's own training σ's, drawn and weighted by
diffusers' own SD3 helpers, and x_t is the closed form (1 − σ)·x_0 + σ·ε.
Every random draw takes an explicit generator so a step can be replayed.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

PREDICTION_TYPES = ("epsilon", "v_prediction")


# Flow matching (SD3, Flux): where training puts its timesteps, and how it weights the loss there.
class TimestepSampling(str, Enum):
    uniform = "uniform"
    logit_normal = "logit-normal"
    mode = "mode"


class WeightingScheme(str, Enum):
    none = "none"
    sigma_sqrt = "sigma_sqrt"
    cosmap = "cosmap"


def training_scheduler(config: dict[str, Any]):
    """A DDPM scheduler with the model's betas and prediction type.

    Samplers like Euler or PNDM keep the same training schedule but their
    `add_noise` works in sigma space; DDPM's is the closed form
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4).
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(dict(config))


def sample_timesteps(batch: int, num_train_timesteps: int, generator, device):
    """Uniform t in [0, T), one per sample (Ho et al. 2020, Algorithm 1)."""
    import torch

    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device).long()


def sample_noise(latents, generator, noise_offset: float = 0.0):
    """Gaussian noise like ``latents``, plus a per-channel constant shift when ``noise_offset`` > 0.

    Offset noise (Guttenberg 2023, "Diffusion with Offset Noise") lets the
    model change an image's mean brightness, which plain noise almost never asks it to.
    """
    import torch

    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset > 0:
        b, c = latents.shape[:2]
        shift = torch.randn((b, c, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * shift
    return noise


def regression_target(scheduler, latents, noise, timesteps):
    """What the UNet should output: the noise (epsilon models) or v (v-prediction models).

    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, "Progressive Distillation").
    """
    from sdcli.errors import ModelError

    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ModelError(f"cannot fine-tune a model with prediction_type {kind!r}; only epsilon and v_prediction")


def min_snr_weights(snr, gamma: float, prediction_type: str):
    """Per-sample loss weights min(SNR, gamma) / SNR (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR").

    For v-prediction the MSE on v already carries a factor SNR + 1, so the
    weight is min(SNR, gamma) / (SNR + 1) to land on the same objective.
    """
    import torch

    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def debiased_weights(snr, prediction_type: str, snr_floor: float | None = None):
    """Per-sample loss weights 1/sqrt(SNR) on the ε-MSE (Yu et al. 2024, "Debias the Training of Diffusion
    Models"), carried over to v-prediction as min-SNR is: sqrt(SNR) / (SNR + 1) on the v-MSE.

    Against min-SNR it keeps more weight at high noise (where a picture's colours and layout are decided)
    while still taking it off the low-noise timesteps. kohya's --debiased_estimation_loss weighs v-models
    by 1 / (SNR + 1) instead, which leaves high noise at full weight. SNR is capped at 1000, as kohya does.
    On v-prediction the weight still falls to 0 at the noisiest timesteps (SNR → 0, all of it at a zero-
    terminal-SNR model's last one); ``snr_floor`` raises SNR to at least that value first, so every noisier
    timestep keeps the floor's weight.
    """
    import torch

    if snr_floor:
        snr = snr.clamp(min=snr_floor)
    root = snr.clamp(max=1000.0).sqrt()
    if prediction_type != "v_prediction":
        return 1 / root
    # (1 / root) * SNR / (SNR + 1), written so that SNR = 0 (a zero-terminal-SNR model's last step) gives 0.
    return torch.where(snr > 1000.0, snr / root, root) / (snr + 1)


def check_ddpm_weighting(snr_gamma: float | None, debiased: bool, *, flow: bool, model: str,
                         snr_floor: float | None = None) -> None:
    """The refusals `finetune` and `inspect-schedule --training` share, in one line each (UsageError):
    γ not positive, both weightings at once, a floor that is not positive or without --debiased-loss, either
    weighting on a flow-matching ``model`` (named in the message)."""
    from sdcli.errors import UsageError

    if snr_gamma is not None and not snr_gamma > 0:
        raise UsageError(f"--snr-gamma must be positive, got {snr_gamma}")
    if snr_gamma is not None and debiased:
        raise UsageError("--snr-gamma and --debiased-loss are two loss weightings; give one")
    if snr_floor is not None and not snr_floor > 0:
        raise UsageError(f"--debiased-snr-floor must be positive, got {snr_floor}")
    if snr_floor is not None and not debiased:
        raise UsageError("--debiased-snr-floor sets a floor under --debiased-loss's weighting; give --debiased-loss too")
    if flow:
        refuse_ddpm_weighting(snr_gamma, debiased, model)


def check_sampling_shape(sampling: str | None, *, logit_mean: float | None = None, logit_std: float | None = None,
                         mode_scale: float | None = None) -> None:
    """Each shape option belongs to one timestep sampling; given with another it would be silently ignored, so it
    is refused in one line (`finetune` and `inspect-schedule --training` share this)."""
    from sdcli.errors import UsageError

    for flag, value, belongs in (("--logit-mean", logit_mean, "logit-normal"), ("--logit-std", logit_std, "logit-normal"),
                                 ("--mode-scale", mode_scale, "mode")):
        if value is not None and sampling != belongs:
            raise UsageError(f"{flag} shapes --timestep-sampling {belongs}, which was not chosen")


def refuse_ddpm_weighting(snr_gamma: float | None, debiased: bool, model: str) -> None:
    """Either DDPM weighting given for a flow-matching ``model`` is refused in one line."""
    from sdcli.errors import UsageError

    for flag, given in (("--snr-gamma", snr_gamma is not None), ("--debiased-loss", debiased)):
        if given:
            raise UsageError(f"{flag} is a loss weighting for DDPM models; {model} trains by flow matching: "
                             "weight it with --weighting-scheme")


def ddpm_loss_weights(snr, prediction_type: str, *, snr_gamma: float | None = None, debiased: bool = False,
                      snr_floor: float | None = None):
    """The DDPM objective's per-sample weights: None (plain MSE), min-SNR-γ, or debiased estimation
    (with ``snr_floor``, see `debiased_weights`)."""
    if snr_gamma is not None:
        return min_snr_weights(snr, snr_gamma, prediction_type)
    if debiased:
        return debiased_weights(snr, prediction_type, snr_floor)
    return None


def diffusion_loss(prediction, target, weights=None, mask=None):
    """Plain MSE, computed in float32; ``weights`` (one per sample) rescale each sample's mean error.

    ``mask`` (B, 1, h, w), the loss masks' per-latent-pixel weights (`sdcli.training.data.latent_weights`),
    multiplies each squared error before the mean, as kohya's masked loss does: loss = mean over samples b of
    s_b · mean over (c, y, x) of m[b, y, x] · (prediction − target)², so a masked-out latent pixel contributes
    its weight's share and no more (the mean is not renormalised by the mask's area)."""
    import torch.nn.functional as F

    if weights is None and mask is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    squared = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if mask is not None:
        squared = squared * mask.float()
    per_sample = squared.mean(dim=tuple(range(1, squared.ndim)))
    return (per_sample * weights.float()).mean() if weights is not None else per_sample.mean()


def step_loss(unet, scheduler, latents, cond, generator, *, noise_offset: float = 0.0, snr_gamma: float | None = None,
              debiased: bool = False, snr_floor: float | None = None, mask=None):
    """One training step's loss: noise x_0 to a random t in one jump, predict, regress.

    ``cond`` holds ``encoder_hidden_states`` and, for SDXL, ``added_cond_kwargs``.
    """
    noise = sample_noise(latents, generator, noise_offset)
    timesteps = sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, generator, latents.device)
    return ddpm_loss(unet, scheduler, latents, cond, noise, timesteps, snr_gamma=snr_gamma, debiased=debiased,
                     snr_floor=snr_floor, mask=mask)


def ddpm_loss(unet, scheduler, latents, cond, noise, timesteps, *, snr_gamma: float | None = None,
              debiased: bool = False, snr_floor: float | None = None, mask=None):
    """The loss at given noise and timesteps: x_t by the scheduler's `add_noise`, MSE onto ε or v, weighted
    per sample by `ddpm_loss_weights`. `step_loss` draws them; validation fixes them (`validation_timesteps`)."""
    from diffusers.training_utils import compute_snr

    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = regression_target(scheduler, latents, noise, timesteps)
    prediction = unet(noisy, timesteps, **cond, return_dict=False)[0]
    weights = None
    if snr_gamma is not None or debiased:
        weights = ddpm_loss_weights(compute_snr(scheduler, timesteps), scheduler.config.prediction_type,
                                    snr_gamma=snr_gamma, debiased=debiased, snr_floor=snr_floor)
    return diffusion_loss(prediction, target, weights, mask)


def validation_timesteps(scheduler, count: int, device="cpu"):
    """``count`` fixed timesteps spread evenly over [0, T): the midpoints of equal bins, so their mean loss is
    the midpoint-rule estimate of the loss under training's uniform t (T = 1000, count 4: 125, 375, 625, 875)."""
    import torch

    T = scheduler.config.num_train_timesteps
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * T / count).long().to(device)


# ---------------------------------------------------------------------------
# Flow matching: x_t = (1 − σ)·x_0 + σ·ε, the network regressing the velocity ε − x_0.


def sample_flow_u(batch: int, sampling: str = "uniform", *, logit_mean: float = 0.0, logit_std: float = 1.0,
                  mode_scale: float = 1.29, generator=None, device="cpu"):
    """u ∈ [0, 1) per sample: uniform, logit-normal (Esser et al. 2024, §3.1: u = sigmoid(N(m, s))) or SD3's
    mode sampling, drawn by diffusers' own ``compute_density_for_timestep_sampling``."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheme = {"uniform": "none", "logit-normal": "logit_normal", "mode": "mode"}[sampling]
    return compute_density_for_timestep_sampling(scheme, batch, logit_mean=logit_mean, logit_std=logit_std,
                                                 mode_scale=mode_scale, device=device, generator=generator)


def flow_sigmas(scheduler, u):
    """(σ, model timestep) for each u, as diffusers' SD3 and Flux training scripts pick them: the
    scheduler's training σ at index ⌊u·T⌋ (its σ's run from 1 down, already shifted when the shift is static)."""
    T = scheduler.config.num_train_timesteps
    index = (u * T).long().clamp(0, T - 1).cpu()
    return scheduler.sigmas[index].to(u.device), scheduler.timesteps[index].to(u.device)


def flow_loss_weights(scheme: str, sigmas):
    """Per-sample loss weights: none, σ⁻² (``sigma_sqrt``) or the cosine map (Esser et al. 2024), from
    diffusers' ``compute_loss_weighting_for_sd3``."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(scheme, sigmas)


def flow_training_scheduler(config: dict[str, Any]):
    """The model's flow-matching scheduler, fresh from its config: its training σ's carry the model's static
    shift (SD3's 3.0), as diffusers' SD3 training script uses them; a resolution-dependent shift (Flux) is
    chosen per image at sampling time, so Flux trains on the unshifted σ's, as diffusers' Flux script does."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(dict(config))


def flow_step_loss(predict, scheduler, latents, generator, *, sampling: str = "uniform", logit_mean: float = 0.0,
                   logit_std: float = 1.0, mode_scale: float = 1.29, weighting: str = "none", mask=None):
    """One flow-matching step's loss (Lipman et al. 2023; Esser et al. 2024): draw σ, jump x_0 to
    x_t = (1 − σ)·x_0 + σ·ε, and regress ``predict(x_t, timesteps)`` onto the velocity ε − x_0 with plain
    MSE, each sample weighted by the scheme (none: all 1).
    """
    import torch

    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    u = sample_flow_u(latents.shape[0], sampling, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
                      generator=generator, device=latents.device)
    sigmas, timesteps = flow_sigmas(scheduler, u)
    return flow_loss(predict, latents, noise, sigmas, timesteps, weighting=weighting, mask=mask)


def flow_loss(predict, latents, noise, sigmas, timesteps, *, weighting: str = "none", mask=None):
    """The loss at given noise and σ: x_t = (1 − σ)·x_0 + σ·ε, MSE onto ε − x_0, weighted by the scheme.
    `flow_step_loss` draws them; validation fixes them (`validation_sigmas`)."""
    s = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    noisy = (1 - s) * latents + s * noise
    prediction = predict(noisy, timesteps)
    weights = None if weighting == "none" else flow_loss_weights(weighting, sigmas)
    return diffusion_loss(prediction, noise - latents, weights, mask)


def validation_sigmas(scheduler, count: int, device="cpu"):
    """(σ, model timestep) at ``count`` fixed places spread evenly over the schedule: u at the midpoints of
    equal bins of [0, 1), through `flow_sigmas` as training's uniform draw goes. Unshifted (Flux) that is σ
    evenly spaced (count 4: 0.875, 0.625, 0.375, 0.125); SD3's static shift moves them where its training
    σ's are."""
    import torch

    u = (torch.arange(count, dtype=torch.float32) + 0.5) / count
    sigmas, timesteps = flow_sigmas(scheduler, u)
    return sigmas.to(device), timesteps.to(device)


# ---------------------------------------------------------------------------
# DreamBooth


def prior_preservation_loss(instance_loss, class_loss, weight: float):
    """DreamBooth's objective (Ruiz et al. 2023, eq. 2): the denoising loss on the instance batch plus
    ``weight`` × the same loss on the class batch (class images under the class prompt), which is what
    diffusers' train_dreambooth scripts compute (``loss + prior_loss_weight * prior_loss``, each the plain
    MSE of its half of the batch). Each argument is a function computing its loss; the instance one runs
    first, so both draw their noise from one generator in a fixed order."""
    loss = instance_loss()
    return loss + weight * class_loss()

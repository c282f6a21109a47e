"""The training objective against a hand computation of the forward process and its targets."""

from __future__ import annotations

import pytest
import torch

from sdcli.errors import ModelError
from sdcli.training.objective import (ddpm_loss_weights, min_snr_weights, sample_noise, step_loss,
                                     training_scheduler)

BETA_START, BETA_END, T = 0.00085, 0.012, 1000


def _config(prediction_type):
    return {"_class_name": "PNDMScheduler", "beta_start": BETA_START, "beta_end": BETA_END,
            "beta_schedule": "scaled_linear", "num_train_timesteps": T, "prediction_type": prediction_type}


def _alphas_cumprod():
    # Stable Diffusion's "scaled_linear" betas, written out by hand rather than read from diffusers.
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


class RecordingUNet:
    """Stands in for the UNet: remembers its input and returns a fixed prediction."""

    def __init__(self, prediction):
        self.prediction = prediction
        self.seen = None

    def __call__(self, sample, timestep, return_dict=False, **cond):
        self.seen = (sample.clone(), timestep.clone(), cond)
        return (self.prediction,)


def _hand(prediction_type, seed, latents, prediction, gamma=None):
    """Replay the step's draws from the same seed and compute x_t, the target and the loss by hand."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, T, (latents.shape[0],), generator=g)
    abar = _alphas_cumprod()[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    target = noise if prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    if gamma is not None:
        snr = (abar / (1 - abar)).view(-1)
        weight = torch.clamp(snr, max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        per_sample = per_sample * weight
    return x_t, t, per_sample.mean()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_loss_is_mse_to_noise_or_v_as_the_scheduler_says(prediction_type, gamma):
    scheduler = training_scheduler(_config(prediction_type))
    torch.manual_seed(0)
    latents = torch.randn(3, 4, 8, 8)
    prediction = torch.randn(3, 4, 8, 8)
    unet = RecordingUNet(prediction)
    loss = step_loss(unet, scheduler, latents, {"encoder_hidden_states": None}, torch.Generator().manual_seed(7),
                     snr_gamma=gamma)
    x_t, t, expected = _hand(prediction_type, 7, latents, prediction, gamma)
    assert torch.equal(unet.seen[1], t)
    torch.testing.assert_close(unet.seen[0], x_t, rtol=1e-5, atol=1e-5)  # one closed-form jump from x_0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    other = "v_prediction" if prediction_type == "epsilon" else "epsilon"
    assert not torch.allclose(loss, _hand(other, 7, latents, prediction, gamma)[2], rtol=1e-3)


def test_min_snr_weights_clip_high_snr_only():
    snr = torch.tensor([0.5, 5.0, 50.0])
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))


def test_noise_offset_shifts_each_channel_and_zero_is_plain_noise():
    latents = torch.zeros(64, 4, 16, 16)
    plain = sample_noise(latents, torch.Generator().manual_seed(1))
    torch.testing.assert_close(plain, torch.randn(64, 4, 16, 16, generator=torch.Generator().manual_seed(1)))
    shifted = sample_noise(latents, torch.Generator().manual_seed(1), noise_offset=0.5)
    channel_means = (shifted - plain).mean(dim=(2, 3))
    assert channel_means.std() == pytest.approx(0.5, rel=0.2)  # one N(0, 0.5^2) shift per (sample, channel)
    assert torch.allclose((shifted - plain), channel_means[:, :, None, None].expand_as(plain), atol=1e-6)


def test_sample_prediction_is_refused():
    scheduler = training_scheduler(_config("sample"))
    with pytest.raises(ModelError, match="prediction_type 'sample'"):
        step_loss(RecordingUNet(torch.zeros(1, 4, 8, 8)), scheduler, torch.zeros(1, 4, 8, 8),
                  {"encoder_hidden_states": None}, torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------------
# Flow matching (SD3, Flux): x_t = (1 − σ)·x_0 + σ·ε, regressing the velocity ε − x_0.


class RecordingTransformer:
    """Stands in for the transformer behind a family's predict: remembers x_t and the timestep."""

    def __init__(self, prediction):
        self.prediction = prediction
        self.seen = None

    def __call__(self, noisy, timesteps):
        self.seen = (noisy.clone(), timesteps.clone())
        return self.prediction


def _flow_scheduler(shift, dynamic=False):
    from sdcli.training.objective import flow_training_scheduler

    return flow_training_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": T,
                                    "shift": shift, "use_dynamic_shifting": dynamic})


def _flow_hand(seed, latents, prediction, *, shift, sampling, weighting, m=0.0, s=1.0, mode_scale=1.29):
    """Replay the step's draws and compute σ, x_t, the target and the loss by hand (Esser et al. 2024)."""
    import math

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    b = latents.shape[0]
    if sampling == "logit-normal":  # u = sigmoid(N(m, s²))
        u = torch.sigmoid(m + s * torch.randn(b, generator=g))
    elif sampling == "mode":  # f_mode(u; s) = 1 − u − s·(cos²(πu/2) − 1 + u)
        u0 = torch.rand(b, generator=g)
        u = 1 - u0 - mode_scale * (torch.cos(math.pi * u0 / 2) ** 2 - 1 + u0)
    else:
        u = torch.rand(b, generator=g)
    i = (u * T).long().clamp(0, T - 1).double()
    base = (T - i) / T  # the scheduler's training σ's run from 1 down to 1/T ...
    sigma = shift * base / (1 + (shift - 1) * base)  # ... shifted to noise: σ' = shift·σ / (1 + (shift − 1)·σ)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise
    per_sample = ((prediction - (noise - latents)) ** 2).mean(dim=(1, 2, 3)).double()
    weight = {"none": torch.ones_like(sigma), "sigma_sqrt": sigma ** -2.0,
              "cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))}[weighting]
    return x_t.float(), (sigma * T).float(), (per_sample * weight).mean().float()


@pytest.mark.parametrize("sampling", ["uniform", "logit-normal", "mode"])
@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_flow_loss_is_mse_to_the_velocity_at_the_drawn_sigma(sampling, weighting):
    from sdcli.training.objective import flow_step_loss

    torch.manual_seed(0)
    latents, prediction = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    model = RecordingTransformer(prediction)
    shape = {"logit-normal": dict(logit_mean=0.3, logit_std=0.8), "mode": dict(mode_scale=1.0)}.get(sampling, {})
    loss = flow_step_loss(model, _flow_scheduler(3.0), latents, torch.Generator().manual_seed(7), sampling=sampling,
                          weighting=weighting, **shape)
    x_t, t, expected = _flow_hand(7, latents, prediction, shift=3.0, sampling=sampling, weighting=weighting,
                                  m=0.3, s=0.8, mode_scale=1.0)
    torch.testing.assert_close(model.seen[1], t, rtol=1e-4, atol=1e-3)  # the model's timestep is σ·1000
    torch.testing.assert_close(model.seen[0], x_t, rtol=1e-5, atol=1e-5)  # one closed-form jump from x_0
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    # The hand computation can tell the shift apart: unshifted σ's give another loss.
    if weighting != "none":
        unshifted = _flow_hand(7, latents, prediction, shift=1.0, sampling=sampling, weighting=weighting, m=0.3,
                               s=0.8, mode_scale=1.0)[2]
        assert not torch.allclose(loss, unshifted, rtol=1e-3)


def test_a_resolution_dependent_shift_trains_on_the_unshifted_sigmas():
    """Flux shifts by image size at sampling time; its training σ's are the plain ones (diffusers' Flux script)."""
    from sdcli.training.objective import flow_step_loss

    latents, prediction = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    model = RecordingTransformer(prediction)
    loss = flow_step_loss(model, _flow_scheduler(3.0, dynamic=True), latents, torch.Generator().manual_seed(1),
                          weighting="sigma_sqrt")
    x_t, t, expected = _flow_hand(1, latents, prediction, shift=1.0, sampling="uniform", weighting="sigma_sqrt")
    torch.testing.assert_close(model.seen[1], t, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weighting", [dict(snr_gamma=5.0), dict(debiased=True)], ids=["min-snr", "debiased"])
def test_a_v_model_gets_the_weighting_its_epsilon_form_defines(weighting):
    # Each weighting is defined on the ε-MSE; a v-prediction model's weight must give the same loss for the
    # same mistake: ε̂ − ε = α (v̂ − v), so w_v |v̂ − v|² = w_ε |ε̂ − ε|² with ε̂ = α v̂ + σ x_t.
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(7, 4, 8, 8, generator=g), torch.randn(7, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 50, 250, 500, 750, 999])
    x_t, v = scheduler.add_noise(x0, noise, t), scheduler.get_velocity(x0, noise, t)
    v_hat = v + 0.1 * torch.randn(v.shape, generator=g)
    alpha = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    eps_hat = alpha * v_hat + (1 - alpha**2).sqrt() * x_t
    snr = compute_snr(scheduler, t)
    w_v = ddpm_loss_weights(snr, "v_prediction", **weighting)
    w_eps = ddpm_loss_weights(snr, "epsilon", **weighting)
    v_loss = w_v * ((v_hat - v) ** 2).mean(dim=(1, 2, 3))
    eps_loss = w_eps * ((eps_hat - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(v_loss, eps_loss, rtol=1e-3, atol=1e-6)
    assert ddpm_loss_weights(snr, "v_prediction") is None  # plain MSE: no weights


def test_a_debiased_snr_floor_gives_every_noisier_timestep_the_floors_weight():
    from sdcli.training.objective import debiased_weights

    snr, floor = torch.tensor([0.0, 1e-4, 0.0083, 0.05, 1.0, 50.0]), 0.0083
    for prediction_type in ("v_prediction", "epsilon"):
        plain, floored = debiased_weights(snr, prediction_type), debiased_weights(snr, prediction_type, floor)
        at_floor = debiased_weights(torch.tensor([floor]), prediction_type)
        torch.testing.assert_close(floored[:3], at_floor.expand(3))
        assert torch.equal(floored[3:], plain[3:])  # less noisy than the floor: untouched
    # v-prediction: the debiased weight falls to 0 at SNR 0 (a zero-terminal-SNR model's last step); floored, it
    # stays at √f/(f+1). On ε it is capped instead of growing without bound.
    v_plain, v_floored = debiased_weights(snr, "v_prediction"), debiased_weights(snr, "v_prediction", floor)
    assert v_plain[0] == 0 and v_floored[0] == pytest.approx(floor**0.5 / (floor + 1))
    assert debiased_weights(snr, "epsilon", floor)[0] == pytest.approx(floor**-0.5)


def test_finetune_trains_on_the_weighting_it_was_given(tiny_models, dataset, tmp_path, make_config):
    # The same seed, data and first draw: only the weighting moves the first step's loss; the choice is recorded.
    import json

    from sdcli.training import finetune

    runs = {name: finetune(make_config(dataset, tmp_path / name, tiny_models["sd2"], max_steps=1, seed=3, **kw))
            for name, kw in (("plain", {}), ("debiased", {"debiased_loss": True}), ("min-snr", {"snr_gamma": 5.0}),
                             ("floored", {"debiased_loss": True, "debiased_snr_floor": 100.0}))}
    losses = {name: run.losses[0] for name, run in runs.items()}
    assert len(set(losses.values())) == 4, losses
    record = json.loads((tmp_path / "debiased" / "training_settings.json").read_text())["config"]
    assert record["debiased_loss"] is True and record["snr_gamma"] is None and record["debiased_snr_floor"] is None
    record = json.loads((tmp_path / "floored" / "training_settings.json").read_text())["config"]
    assert record["debiased_snr_floor"] == 100.0

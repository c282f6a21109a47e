"""Flow-matching schedules (SD3, Flux) in the (α, σ) core: numbers read off diffusers' FlowMatch scheduler."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import one_error_line, strict_json
from sdcli.schedule import core as S


def flow(name, **kw):
    return S.build(name, S.preset_config(name), **kw)


def test_sd3_sigmas_are_diffusers_training_sigmas_and_alpha_is_one_minus_sigma():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sc = flow("sd3")
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.double().flip(0)
    p = sc.process
    torch.testing.assert_close(p.noise_scale, theirs)
    torch.testing.assert_close(p.signal_scale, 1 - theirs)
    torch.testing.assert_close(p.snr()[:-1], ((1 - theirs) / theirs)[:-1] ** 2)
    info = S.describe(sc, [0, 500, 999], 10)
    assert info["family"] == "flow" and info["shift"] == 3.0 and info["prediction_type"] == "flow"
    assert info["terminal_snr"] == 0 and info["first_timestep_is_terminal"] and info["warnings"] == []
    row = info["rows"][-1]
    assert row["noise_scale"] == 1.0 and row["signal_scale"] == 0.0 and row["model_t"] == 1000.0


def test_a_smaller_shift_spends_more_steps_at_low_noise():
    low, high = (S.describe(flow("sd3", shift=s), [500], 10) for s in (1.0, 3.0))
    assert low["rows"][0]["noise_scale"] < high["rows"][0]["noise_scale"]
    assert sum(x < 0.5 for x in low["sampling_sigmas"]) > sum(x < 0.5 for x in high["sampling_sigmas"])


def test_flux_shift_comes_from_the_token_count_as_diffusers_computes_it():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for size, tokens in ((1024, 4096), (512, 1024)):
        sc = flow("flux", resolution=(size, size))
        info = S.describe(sc, [999], 8)
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        assert info["shift_mu"] == pytest.approx(mu) and info["shift"] == pytest.approx(math.exp(mu))
        reference = FlowMatchEulerDiscreteScheduler.from_config(S.preset_config("flux"))
        reference.set_timesteps(8, mu=mu)
        assert info["sampling_sigmas"] == pytest.approx(reference.sigmas.tolist())
    small, large = (flow("flux", resolution=(s, s)).process.noise_scale[500] for s in (512, 1024))
    assert large > small  # more tokens, more shift: the same t is noisier


@pytest.mark.parametrize("preset,module,mu_applies", [
    ("chroma", "chroma.pipeline_chroma", True),
    ("qwen-image", "qwenimage.pipeline_qwenimage", True),
    ("z-image", "z_image.pipeline_z_image", False),  # a static shift: the μ its pipeline computes goes unused
    ("z-image-turbo", "z_image.pipeline_z_image", False),
])
def test_each_family_preset_shifts_as_its_pipeline_computes_it(preset, module, mu_applies):
    import importlib

    from diffusers import FlowMatchEulerDiscreteScheduler

    calculate_shift = importlib.import_module(f"diffusers.pipelines.{module}").calculate_shift
    config = S.preset_config(preset)
    info = S.describe(flow(preset, **({"resolution": (1024, 768)} if mu_applies else {})), [999], 8)
    # Each pipeline's μ: linear in the latent's 2x2 tokens, between its scheduler config's bounds.
    mu = calculate_shift(64 * 48, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    reference = FlowMatchEulerDiscreteScheduler.from_config(config)
    reference.set_timesteps(8, mu=mu)
    assert info["sampling_sigmas"] == pytest.approx(reference.sigmas.tolist())
    assert (info["shift_mu"] == pytest.approx(mu)) if mu_applies else info["shift"] == config["shift"]


def test_q_sample_is_the_flow_forward_process_diffusers_adds_noise_with():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sc = flow("sd3")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    index = 300  # diffusers counts σ from 1 down; our t counts up
    t = sc.num_train_timesteps - 1 - index
    ours = S.q_sample(x0, sc.process.signal_scale[t].float(), sc.process.noise_scale[t].float(), eps)
    theirs = scheduler.scale_noise(x0, scheduler.timesteps[index : index + 1], eps)
    torch.testing.assert_close(ours, theirs)


def test_both_families_on_one_axis_in_json_and_plot(cli, tmp_path):
    result = cli("inspect-schedule", "--compare", "stable-diffusion,zero-snr,sd3,flux", "--at", "0,999",
                 "--format", "json", "--plot", tmp_path / "s.png", "-q")
    assert result.exit_code == 0, result.stderr
    doc = strict_json(result.stdout)
    assert [s["family"] for s in doc["schedules"]] == ["ddpm", "ddpm", "flow", "flow"]
    assert [s["shift"] is None for s in doc["schedules"]] == [True, True, False, False]
    assert all({"signal_scale", "noise_scale", "snr", "log_snr"} <= set(r) for s in doc["schedules"] for r in s["rows"])
    assert (tmp_path / "s.png").stat().st_size > 0


@pytest.mark.parametrize("args,expected", [
    (["--preset", "sd3", "--shift", "0"], "--shift must be positive"),
    (["--preset", "flux", "--resolution", "1000x1000"], "multiples of 16"),
    (["--preset", "flux", "--resolution", "big"], "WIDTHxHEIGHT"),
    (["--preset", "sd3", "--rescale-zero-snr"], "option of DDPM (β) schedules"),
    (["--preset", "sd3", "--beta-schedule", "linear"], "option of DDPM (β) schedules"),
    (["--preset", "stable-diffusion", "--shift", "2"], "option of flow-matching schedules"),
    (["--preset", "sd3", "--scheduler", "ddim"], "flow-matching schedule"),
    (["--preset", "sd3", "--resolution", "1024x1024"], "static shift of 3"),
    (["--preset", "stable-diffusion", "--training", "--timestep-sampling", "mode"], "flow-matching option"),
    (["--preset", "sd3", "--training", "--snr-gamma", "5"], "--snr-gamma is a loss weighting for DDPM"),
    (["--preset", "sd3", "--training", "--debiased-loss"], "--debiased-loss is a loss weighting for DDPM"),
    (["--preset", "stable-diffusion", "--training", "--debiased-loss", "--snr-gamma", "5"], "two loss weightings"),
    (["--preset", "stable-diffusion", "--training", "--debiased-snr-floor", "0.01"], "give --debiased-loss too"),
    (["--preset", "stable-diffusion", "--training", "--debiased-loss", "--debiased-snr-floor", "0"],
     "--debiased-snr-floor must be positive"),
])
def test_options_of_the_other_family_are_refused_in_one_line(cli, args, expected):
    assert expected in one_error_line(cli("inspect-schedule", *args), 2)


def test_training_profile_draws_as_finetune_does_and_is_repeatable(cli):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    args = ("inspect-schedule", "--preset", "flux", "--training", "--timestep-sampling", "logit-normal",
            "--weighting-scheme", "cosmap", "--format", "json", "-q")
    first, second = (strict_json(cli(*args).stdout)["training"] for _ in range(2))
    assert first == second  # fixed draws: the same table every time
    shares = [b["share"] for b in first["bins"]]
    assert sum(shares) == pytest.approx(1) and sum(b["emphasis"] for b in first["bins"]) == pytest.approx(1)
    # Flux trains on unshifted σ: logit-normal(0, 1) is symmetric around σ = 0.5 and peaks there.
    assert max(shares) in shares[4:6] and shares[0] == pytest.approx(shares[-1], abs=0.01)
    middle = torch.tensor([0.45], dtype=torch.float64)
    assert first["bins"][4]["weight"] == pytest.approx(float(compute_loss_weighting_for_sd3("cosmap", middle)), rel=0.05)
    ddpm = strict_json(cli("inspect-schedule", "--preset", "stable-diffusion", "--training", "--snr-gamma", "5",
                           "--format", "json", "-q").stdout)["training"]
    assert [b["share"] for b in ddpm["bins"]] == pytest.approx([0.1] * 10, abs=0.005)  # uniform t
    assert ddpm["bins"][0]["weight"] < 0.5 < ddpm["bins"][5]["weight"] == pytest.approx(1)  # min-SNR caps low t
    debiased = strict_json(cli("inspect-schedule", "--preset", "stable-diffusion", "--training", "--debiased-loss",
                               "--format", "json", "-q").stdout)["training"]
    assert debiased["weighting"] == "debiased"
    # 1/√SNR on ε: still under one at low t, and growing past one where SNR < 1 (high t), unlike min-SNR.
    assert debiased["bins"][0]["weight"] < 0.5 and debiased["bins"][9]["weight"] > 2
    assert debiased["bins"][9]["emphasis"] > ddpm["bins"][9]["emphasis"]
    floored = strict_json(cli("inspect-schedule", "--preset", "stable-diffusion", "--training", "--debiased-loss",
                              "--debiased-snr-floor", "0.05", "--format", "json", "-q").stdout)["training"]
    # SD's SNR falls below 0.05 only past t ≈ 770: the noisiest bin's 1/√SNR is capped, the low bins untouched.
    assert floored["snr_floor"] == 0.05 and floored["bins"][9]["weight"] == pytest.approx(0.05**-0.5)
    assert floored["bins"][0]["weight"] == pytest.approx(debiased["bins"][0]["weight"])

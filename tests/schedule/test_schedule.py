"""sdcli.schedule.core and sdcli.schedule.report: the numbers are diffusers', the maths matches the forward process,
and every schedule is held as its (α_t, σ_t)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sdcli.schedule import core as sched
from sdcli.errors import ModelError, UsageError
from conftest import strict_json


@pytest.fixture(autouse=True)
def _one_thread():
    # The machine is shared; these tensors are small.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def preset(name: str, **overrides) -> sched.Schedule:
    return sched.build(name, sched.with_overrides(sched.preset_config(name), **overrides))


# ---------------------------------------------------------------- numbers are the diffusers class's


@pytest.mark.parametrize("name,kwargs", [
    ("ddpm-linear", dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
    ("cosine", dict(beta_schedule="squaredcos_cap_v2")),
    ("stable-diffusion", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    ("zero-snr", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)),
])
def test_rows_are_the_diffusers_scheduler_values(name, kwargs):
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(num_train_timesteps=1000, **kwargs)  # built independently of sdcli
    s = preset(name)
    for t in (0, 1, 250, 500, 998, 999):
        r = sched.row(s, t)
        assert r["beta"] == float(reference.betas[t])
        assert r["alpha"] == float(reference.alphas[t])
        assert r["alpha_bar"] == float(reference.alphas_cumprod[t])
        ab = float(reference.alphas_cumprod[t])
        assert r["sqrt_alpha_bar"] == pytest.approx(ab**0.5, rel=1e-12)
        assert r["sqrt_one_minus_alpha_bar"] == pytest.approx((1 - ab) ** 0.5, rel=1e-12)
        if ab > 0:
            assert r["snr"] == pytest.approx(ab / (1 - ab), rel=1e-12)
            assert r["log_snr"] == pytest.approx(math.log(ab / (1 - ab)), rel=1e-12)
    # ᾱ is the running product of α: the schedule really is the class's, not a look-alike
    assert float(s.forward.alphas_cumprod[10]) == pytest.approx(float(torch.prod(reference.alphas[:11])), rel=1e-6)
    assert float(s.process.extras["alpha_bar"][10]) == float(reference.alphas_cumprod[10])


@pytest.mark.parametrize("name", ["ddpm-linear", "cosine", "stable-diffusion", "zero-snr"])
def test_ddpm_rows_are_alpha_sigma_and_variance_preserving(name):
    """A DDPM row's signal/noise scales are its √ᾱ and √(1−ᾱ), so α² + σ² = 1 (the process preserves variance)."""
    s = preset(name)
    assert s.process.family == "ddpm"
    for t in range(0, 1000, 37):
        r = sched.row(s, t)
        assert r["signal_scale"] == r["sqrt_alpha_bar"] and r["noise_scale"] == r["sqrt_one_minus_alpha_bar"]
        assert r["signal_scale"] ** 2 + r["noise_scale"] ** 2 == pytest.approx(1.0, abs=1e-12)
        assert r["signal_scale"] ** 2 == pytest.approx(r["alpha_bar"], rel=1e-12, abs=1e-300)
        if r["noise_scale"] > 0:
            assert r["snr"] == pytest.approx(r["signal_scale"] ** 2 / r["noise_scale"] ** 2, rel=1e-12)
    # the whole arrays too, not only the sampled rows
    a, sigma = s.process.signal_scale, s.process.noise_scale
    torch.testing.assert_close(a**2 + sigma**2, torch.ones_like(a), rtol=0, atol=1e-12)


def test_core_holds_a_schedule_without_betas():
    """A family with only (α, σ), e.g. flow matching's α = 1 − σ, fits the core and shows no β columns."""
    import io

    from sdcli.schedule.report import write_csv

    sigma = torch.linspace(0.001, 1.0, 100, dtype=torch.float64)
    process = sched.ForwardProcess(family="flow", signal_scale=1 - sigma, noise_scale=sigma)
    s = sched.Schedule(label="flow", config={}, process=process, forward=None, sampler=None)
    assert s.num_train_timesteps == 100
    r = sched.row(s, 10)
    assert set(r) == {"t", "signal_scale", "noise_scale", "snr", "log_snr"}
    assert r["snr"] == pytest.approx(((1 - float(sigma[10])) / float(sigma[10])) ** 2, rel=1e-12)
    assert r["log_snr"] == pytest.approx(math.log(r["snr"]), rel=1e-12)
    last = sched.row(s, 99)
    assert last["snr"] == 0.0 and last["log_snr"] == -math.inf
    # beside a DDPM schedule in one CSV, its β cells stay empty rather than invented
    ddpm = preset("ddpm-linear")
    infos = [{"name": "ddpm-linear", "rows": [sched.row(ddpm, 10)]}, {"name": "flow", "rows": [r]}]
    out = io.StringIO()
    write_csv(infos, out)
    rows = out.getvalue().splitlines()
    assert rows[0].split(",")[1:] == list(sched.row(ddpm, 10))
    flow = dict(zip(rows[0].split(","), rows[2].split(",")))
    assert flow["beta"] == flow["alpha_bar"] == "" and float(flow["noise_scale"]) == pytest.approx(float(sigma[10]))


def test_choices_are_declared_once():
    from sdcli import options
    from sdcli.commands import inspect_schedule

    assert inspect_schedule.BetaSchedule is sched.BetaSchedule
    assert inspect_schedule.PredictionType is sched.PredictionType
    assert options.TimestepSpacing is sched.TimestepSpacing
    assert sched.SPACINGS == ("leading", "linspace", "trailing")
    assert "laplace" in sched.BETA_SCHEDULES and "v_prediction" in sched.PREDICTION_TYPES


@pytest.mark.parametrize("scheduler,spacing,steps", [
    (None, None, 25), ("ddim", "trailing", 10), ("euler", "leading", 7), ("dpm++2m-karras", None, 8), ("heun", None, 5),
])
def test_sampling_timesteps_are_the_samplers(scheduler, spacing, steps):
    import diffusers

    from sdcli.schedule.samplers import get_spec

    s = sched.build("sd", sched.preset_config("stable-diffusion"), scheduler, spacing)
    info = sched.describe(s, [0], steps)
    config = sched.preset_config("stable-diffusion")
    cls = getattr(diffusers, get_spec(scheduler).class_name if scheduler else config["_class_name"])
    extra = dict(get_spec(scheduler).overrides) if scheduler else {}
    if spacing:
        extra["timestep_spacing"] = spacing
    reference = cls.from_config(config, **extra)
    reference.set_timesteps(steps)
    assert info["sampling_timesteps"] == [int(round(float(t))) for t in reference.timesteps]
    assert all(isinstance(t, int) for t in info["sampling_timesteps"])
    assert info["first_timestep_is_terminal"] == (info["sampling_timesteps"][0] == 999)


# ---------------------------------------------------------------- the forward process


def test_closed_form_jump_matches_add_noise():
    s = preset("stable-diffusion")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    ts = [0, 100, 500, 999]
    alpha, sigma = (scale[ts].float().reshape(-1, 1, 1, 1) for scale in (s.process.signal_scale, s.process.noise_scale))
    ours = sched.q_sample(x0, alpha, sigma, eps)
    theirs = s.forward.add_noise(x0, eps, torch.tensor(ts))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # and the strip helper uses exactly that jump, one shared ε for every t
    from sdcli.schedule.report import noised

    torch.testing.assert_close(noised(s, x0[:1], ts, eps[:1]), s.forward.add_noise(x0[:1].expand(4, -1, -1, -1),
                                                                                   eps[:1].expand(4, -1, -1, -1),
                                                                                   torch.tensor(ts)), rtol=0, atol=1e-6)


def test_jump_and_single_steps_agree_in_distribution():
    """q(x_t|x_0) in one jump and t steps of q(x_t|x_{t-1}) must give the same mean and variance."""
    s = preset("stable-diffusion")
    betas = s.forward.betas.double()
    alpha_bar = s.forward.alphas_cumprod.double()
    alpha, sigma = s.process.signal_scale, s.process.noise_scale  # what the jump uses; mean and var below do not
    n = 10_000
    g = torch.Generator().manual_seed(1)
    x0 = torch.tensor([-1.0, -0.3, 0.4, 1.0], dtype=torch.float64)
    x = x0.expand(n, -1).clone()
    checkpoints = {1, 50, 300, 999}
    checked = 0
    for t in range(1000):  # x after iteration t is x_t (x_{-1} := x_0 for the first step)
        x = sched.q_step(x, betas[t], torch.randn(x.shape, generator=g, dtype=torch.float64))
        if t not in checkpoints:
            continue
        jump = sched.q_sample(x0, alpha[t], sigma[t], torch.randn((n, 4), generator=g, dtype=torch.float64))
        mean, var = alpha_bar[t].sqrt() * x0, 1 - alpha_bar[t]
        se_mean = (var / n).sqrt()
        se_var = var * math.sqrt(2 / (n - 1))
        for samples in (x, jump):
            assert ((samples.mean(0) - mean).abs() < 5 * se_mean).all(), (t, samples.mean(0), mean)
            assert ((samples.var(0) - var).abs() < 5 * se_var).all(), (t, samples.var(0), var)
        assert ((x.mean(0) - jump.mean(0)).abs() < 5 * math.sqrt(2) * se_mean).all()
        checked += 1
    assert checked == len(checkpoints)
    # The tolerance has power: a chain that forgets the square roots, x_t = (1−β)x + β·ε, fails it by t = 50.
    y = x0.expand(n, -1).clone()
    for t in range(51):
        y = (1 - betas[t]) * y + betas[t] * torch.randn(y.shape, generator=g, dtype=torch.float64)
    var = 1 - alpha_bar[50]
    assert ((y.var(0) - var).abs() > 5 * var * math.sqrt(2 / (n - 1))).all()


# ---------------------------------------------------------------- terminal SNR and zero-SNR rescale


def test_zero_snr_rescale_gives_terminal_snr_zero_and_json_without_infinity():
    from sdcli.schedule.report import to_json

    s = preset("stable-diffusion", rescale_zero_snr=True)
    info = sched.describe(s, [0, 999], 10)
    assert info["terminal_alpha_bar"] == 0.0
    assert info["terminal_snr"] == 0.0 and info["terminal_log_snr"] == -math.inf
    doc = strict_json(to_json([info]))
    assert doc["terminal_snr"] == 0.0 and doc["terminal_log_snr"] is None
    assert doc["rows"][-1] == {**doc["rows"][-1], "t": 999, "snr": 0.0, "log_snr": None, "alpha_bar": 0.0}
    assert doc["rows"][0]["log_snr"] == pytest.approx(math.log(doc["rows"][0]["snr"]))
    assert doc["config"]["rescale_betas_zero_snr"] is True
    # SD 1.x's sampler (PNDM) cannot rescale: say so rather than pretend
    assert any("PNDMScheduler has no rescale_betas_zero_snr" in w for w in info["warnings"])
    assert any("epsilon prediction" in w for w in info["warnings"])


def test_stable_diffusion_terminal_snr_is_flagged_and_trailing_fixes_the_start():
    info = sched.describe(preset("stable-diffusion"), [999], 25)
    assert info["terminal_snr"] == pytest.approx(0.004682, rel=1e-3)  # Lin et al. 2023, table 1
    assert any("--rescale-zero-snr" in w for w in info["warnings"])
    assert info["sampling_timesteps"][0] == 961 and not info["first_timestep_is_terminal"]
    fixed = sched.describe(preset("zero-snr"), [999], 25)
    assert fixed["first_timestep_is_terminal"] and fixed["warnings"] == []
    assert fixed["terminal_snr"] == 0.0


def test_euler_clamps_terminal_alpha_bar_and_we_say_so():
    s = sched.build("z", sched.preset_config("zero-snr"), "euler")
    info = sched.describe(s, [999], 10)
    assert info["terminal_snr"] == 0.0  # the training schedule
    assert float(s.sampler.alphas_cumprod[-1]) > 0  # diffusers keeps Euler's σ finite
    assert any("EulerDiscreteScheduler uses ᾱ_999" in w for w in info["warnings"])


def test_cosine_terminal_snr_is_near_zero_without_warning():
    info = sched.describe(preset("cosine"), [999], 10)
    assert 0 < info["terminal_snr"] < 1e-8
    assert not any("terminal SNR" in w for w in info["warnings"])


# ---------------------------------------------------------------- overrides and inputs


def test_overrides_change_the_schedule_and_clear_trained_betas():
    from diffusers import DDPMScheduler

    config = {**sched.preset_config("stable-diffusion"), "trained_betas": [0.5] * 1000}
    new = sched.with_overrides(config, beta_schedule="linear", beta_start=0.001, beta_end=0.03, num_train_timesteps=500,
                               prediction_type="v_prediction")
    s = sched.build("x", new)
    reference = DDPMScheduler(num_train_timesteps=500, beta_schedule="linear", beta_start=0.001, beta_end=0.03)
    assert torch.equal(s.forward.alphas_cumprod, reference.alphas_cumprod)
    assert s.num_train_timesteps == 500 and s.sampler.config.prediction_type == "v_prediction"
    assert sched.with_overrides(config, rescale_zero_snr=False)["trained_betas"] == [0.5] * 1000  # untouched


@pytest.mark.parametrize("kwargs,message", [
    (dict(beta_start=0.0), "--beta-start must be between 0 and 1, got 0"),
    (dict(beta_end=1.5), "--beta-end must be between 0 and 1, got 1.5"),
    (dict(beta_end=float("nan")), "--beta-end must be a finite number, got nan"),
    (dict(beta_start=0.02, beta_end=0.01), "must be below"),
    (dict(num_train_timesteps=1), "--num-train-timesteps must be between 2 and 100000"),
    (dict(num_train_timesteps=2_000_000_000), "--num-train-timesteps must be between 2 and 100000"),
    (dict(beta_schedule="exp"), "--beta-schedule 'exp'"),
    (dict(prediction_type="noise"), "--prediction-type 'noise'"),
])
def test_bad_overrides_name_the_value(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        sched.with_overrides(sched.preset_config("stable-diffusion"), **kwargs)


def test_parse_timesteps():
    assert sched.parse_timesteps(None, None, 1000) == [0, 100, 250, 500, 750, 999]
    assert sched.parse_timesteps(None, 400, 1000) == [0, 400, 800, 999]
    assert sched.parse_timesteps(" 5, 0,999 ", None, 1000) == [5, 0, 999]
    for at, every, message in [("1000", None, r"--at 1000: outside .*\[0, 1000\)"), ("-1", None, "outside"),
                               ("a", None, "not an integer"), (",", None, "no timesteps"), (None, 0, "--every must be at least 1, got 0"),
                               ("1", 2, "not both")]:
        with pytest.raises(UsageError, match=message):
            sched.parse_timesteps(at, every, 1000)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(UsageError, match="unknown preset 'nope'.*stable-diffusion"):
        sched.preset_config("nope")


def test_model_config_reads_only_the_scheduler_config(tiny_models):
    folder = tiny_models["sd2"]
    expected = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    assert sched.model_config(folder) == expected
    # the Hub code path (diffusers' load_config) reads the same file when given a folder
    assert {k: v for k, v in sched.hub_config(folder).items() if not k.startswith("_")} == \
        {k: v for k, v in expected.items() if not k.startswith("_")}
    s = sched.build("sd2", sched.model_config(folder))
    assert type(s.sampler).__name__ == "DDIMScheduler" and s.sampler.config.prediction_type == "v_prediction"


def test_model_without_a_beta_schedule_or_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no scheduler/scheduler_config.json"):
        sched.model_config(str(tmp_path))
    # Flow matching is a family of its own now (tests/schedule/test_schedule_flow.py); a config that is neither is
    # refused.
    other = {"_class_name": "ConsistencyModelScheduler", "num_train_timesteps": 40}
    with pytest.raises(ModelError, match="no β schedule"):
        sched.build("cm", other)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelError, match="single-file checkpoint"):
        sched.model_config(str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("sampler", ["dpm++2m-karras", "euler"])
def test_karras_spacing_on_zero_terminal_snr_runs_from_comfyuis_finite_sigma_max(sampler):
    # As ComfyUI does: the last ᾱ is 4.8973e-8 instead of 0, so σ_max = sqrt((1 - ᾱ)/ᾱ) ≈ 4518.8; every other
    # step keeps the rescaled schedule's σ (Lin et al. 2023), down to the model's own σ at t = 0.
    import math

    from diffusers import DDPMScheduler

    from sdcli.schedule.samplers import TERMINAL_ALPHA_BAR, make_scheduler

    config = sched.preset_config("zero-snr")
    sampler = make_scheduler(sampler, config, sigmas="karras")
    sampler.set_timesteps(25)
    sigmas = sampler.sigmas.double()
    assert torch.isfinite(sigmas).all() and bool((sigmas[1:] < sigmas[:-1]).all())  # finite, strictly falling
    assert sigmas[0].item() == pytest.approx(math.sqrt((1 - TERMINAL_ALPHA_BAR) / TERMINAL_ALPHA_BAR), rel=1e-4)
    assert sigmas[0].item() == pytest.approx(4518.76, rel=1e-4) and sigmas[-1].item() == 0.0
    rescaled = DDPMScheduler.from_config(config).alphas_cumprod.double()
    assert rescaled[-1].item() == 0.0  # the schedule the model was trained on: σ_max infinite
    ours = sampler.alphas_cumprod.double()
    torch.testing.assert_close(ours[:-1], rescaled[:-1], rtol=1e-5, atol=0)
    model_sigma_min = math.sqrt((1 - rescaled[0].item()) / rescaled[0].item())
    assert sigmas[-2].item() >= model_sigma_min * (1 - 1e-4)
    assert 0 < sigmas[-2].item() < 1

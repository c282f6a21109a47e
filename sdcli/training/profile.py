"""Where fine-tuning puts its timesteps on a schedule and how much each counts (`inspect-schedule --training`).

The draws and weights are `finetune`'s own (`sdcli.training.objective`), read onto a schedule from
`sdcli.schedule`; the schedule code knows nothing of training, so the arrow runs from here down to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdcli.errors import UsageError
from sdcli.schedule.core import Schedule


@dataclass(frozen=True)
class TrainingChoice:
    """How fine-tuning draws timesteps and weights the loss (the options of `finetune` that shape this)."""

    sampling: str = "uniform"  # flow matching: uniform, logit-normal or mode
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"  # flow matching: none, sigma_sqrt or cosmap
    snr_gamma: float | None = None  # DDPM: min-SNR γ
    debiased: bool = False  # DDPM: debiased-estimation weighting
    snr_floor: float | None = None  # DDPM: the SNR under which the debiased weighting stops falling


def training_choice(*, sampling: str | None = None, logit_mean: float | None = None, logit_std: float | None = None,
                    mode_scale: float | None = None, weighting: str | None = None, snr_gamma: float | None = None,
                    debiased: bool = False, snr_floor: float | None = None) -> TrainingChoice:
    """A `TrainingChoice` from the options as given (None: not given), checked as `finetune` checks them: the
    ranges declared on its settings (`sdcli.training.config`) and the shape options' own sampling."""
    from sdcli.declare import check_setting
    from sdcli.training.config import FinetuneConfig
    from sdcli.training.objective import check_sampling_shape

    for name, value in (("logit_mean", logit_mean), ("logit_std", logit_std), ("mode_scale", mode_scale),
                        ("snr_gamma", snr_gamma), ("debiased_snr_floor", snr_floor)):
        check_setting(FinetuneConfig, name, value)
    sampling = sampling or "uniform"
    check_sampling_shape(sampling, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
    default = TrainingChoice()
    return TrainingChoice(
        sampling=sampling, logit_mean=default.logit_mean if logit_mean is None else logit_mean,
        logit_std=default.logit_std if logit_std is None else logit_std,
        mode_scale=default.mode_scale if mode_scale is None else mode_scale, weighting=weighting or "none",
        snr_gamma=snr_gamma, debiased=debiased, snr_floor=snr_floor)


def training_profile(schedule: Schedule, choice: TrainingChoice, *, bins: int = 10, draws: int = 200_000,
                     seed: int = 0) -> dict[str, Any]:
    """Where training puts its timesteps and how much each counts, from the functions `finetune` draws with.

    ``draws`` timesteps are drawn as training does (fixed seed, so two runs agree); the table bins them
    over the model's timestep axis (DDPM's t, flow matching's σ·T) with the share of draws, the mean loss
    weight, and their product normalised ("emphasis": the share of the gradient each bin gets).
    """
    import torch

    from sdcli.training import objective

    # 1. Check inputs: each family has its own choices
    flow = schedule.process.family == "flow"
    objective.check_ddpm_weighting(choice.snr_gamma, choice.debiased, flow=flow, model=schedule.label,
                                   snr_floor=choice.snr_floor)
    if not flow and (choice.sampling != "uniform" or choice.weighting != "none"):
        flag = "--timestep-sampling" if choice.sampling != "uniform" else "--weighting-scheme"
        raise UsageError(f"{flag} is a flow-matching option (sd3, flux); {schedule.label} is a DDPM model, trained "
                         "on uniform t (weight it with --snr-gamma)")
    T = schedule.num_train_timesteps
    generator = torch.Generator().manual_seed(seed)
    # 2. Draw as training does, and weight
    if flow:
        scheduler = type(schedule.forward).from_config(schedule.config)  # its training σ's, before any sampling
        u = objective.sample_flow_u(draws, choice.sampling, logit_mean=choice.logit_mean, logit_std=choice.logit_std,
                                    mode_scale=choice.mode_scale, generator=generator)
        sigmas, model_t = objective.flow_sigmas(scheduler, u)
        position = model_t.double()
        weights = objective.flow_loss_weights(choice.weighting, sigmas.double())
    else:
        t = objective.sample_timesteps(draws, T, generator, "cpu")
        position = t.double()
        prediction = schedule.config.get("prediction_type", "epsilon")
        weights = objective.ddpm_loss_weights(schedule.process.snr()[t], prediction, snr_gamma=choice.snr_gamma,
                                              debiased=choice.debiased, snr_floor=choice.snr_floor)
        weights = torch.ones(draws, dtype=torch.float64) if weights is None else weights.double()
    # 3. Bin over the timestep axis
    edges = torch.linspace(0, T, bins + 1, dtype=torch.float64)
    which = torch.bucketize(position, edges[1:-1], right=True)
    count = torch.bincount(which, minlength=bins).double()
    total = torch.bincount(which, weights=weights, minlength=bins)
    share = count / draws
    mean_weight = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    emphasis = total / total.sum()
    rows = [{"from": float(edges[i]), "to": float(edges[i + 1]), "share": float(share[i]),
             "weight": float(mean_weight[i]), "emphasis": float(emphasis[i])} for i in range(bins)]
    return {"axis": "sigma*T" if flow else "t", "sampling": choice.sampling if flow else "uniform",
            "weighting": choice.weighting if flow else ("min-snr" if choice.snr_gamma is not None else
                                                        "debiased" if choice.debiased else "none"),
            "logit_mean": choice.logit_mean if flow else None, "logit_std": choice.logit_std if flow else None,
            "mode_scale": choice.mode_scale if flow else None, "snr_gamma": choice.snr_gamma,
            "snr_floor": choice.snr_floor, "draws": draws,
            "seed": seed, "bins": rows}

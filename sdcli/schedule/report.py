"""How `sdcli inspect-schedule` shows a schedule: table, CSV, JSON, a plot, and pictures of x_t.

The numbers come from `sdcli.schedule.core`, whose core is each schedule's signal
scale α_t and noise scale σ_t; this module only lays them out. Columns a family
lacks (β and ᾱ outside DDPM) are left out rather than faked.
rich, matplotlib, PIL and torch are imported inside the functions that draw.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from sdcli import __version__
from sdcli.errors import ModelError, UsageError
from sdcli.schedule.core import Schedule, jsonable, q_sample, visited_t

PLOT_SUFFIXES = (".png", ".svg", ".pdf")
STRIP_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Every row key in CSV order (new keys go last so CSV columns keep their positions); `row()` makes them.
COLUMNS = ("t", "beta", "alpha", "alpha_bar", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar", "snr", "log_snr",
           "signal_scale", "noise_scale", "model_t")
# The table: (row key, header, format). DDPM's √ᾱ and √(1−ᾱ) are its α and σ, so they are not shown twice;
# "1−β_t" is Ho et al.'s α_t, renamed because α_t is the signal scale here.
TABLE = (("t", "t", "d"), ("beta", "β_t", ".6f"), ("alpha", "1−β_t", ".6f"), ("alpha_bar", "ᾱ_t", ".6f"),
         ("model_t", "σ·T", ".1f"), ("signal_scale", "α_t", ".4f"), ("noise_scale", "σ_t", ".4f"), ("snr", "SNR", ".4g"),
         ("log_snr", "log-SNR", ".3f"))
# How each family writes α_t and σ_t, shown in the table's headers when every schedule in it is of that family.
SCALE_HEADERS = {"ddpm": {"signal_scale": "α_t=√ᾱ_t", "noise_scale": "σ_t=√(1−ᾱ_t)"},
                 "flow": {"signal_scale": "α_t=1−σ_t", "noise_scale": "σ_t"}}


# ---------------------------------------------------------------- text: table, CSV, JSON


def _num(value: float, fmt: str) -> str:
    if math.isinf(value):
        return "−inf" if value < 0 else "inf"
    return format(value, fmt).replace("-", "−")


def _present(infos: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    """The ``keys`` some shown row has, in the given order: a family's extras only when that family is shown."""
    have = {k for info in infos for r in info["rows"] for k in r}
    return [k for k in keys if k in have]


def _cell(r: dict[str, Any], key: str, fmt: str) -> str:
    if key not in r:
        return ""
    return str(r[key]) if fmt == "d" else _num(r[key], fmt)


def headline(info: dict[str, Any]) -> str:
    """One line naming the schedule: class, betas, T, prediction type, spacing."""
    c = info["config"]
    if info["family"] == "flow":
        shift = (f"shift μ={info['shift_mu']:.3f} at {info['resolution'][0]}x{info['resolution'][1]} (×{info['shift']:.3g})"
                 if info["shift_mu"] is not None else f"static shift {info['shift']:g}")
        return (f"{info['name']}: {info['scheduler']}, flow matching x_t = (1−σ)·x_0 + σ·ε, {shift}, "
                f"T={info['num_train_timesteps']}, predicts the velocity ε − x_0")
    betas = c.get("beta_schedule", "trained betas")
    if c.get("trained_betas"):
        betas = "trained betas"
    elif betas in ("linear", "scaled_linear", "sigmoid"):
        betas += f" β {c.get('beta_start')}→{c.get('beta_end')}"
    if c.get("rescale_betas_zero_snr"):
        betas += ", rescaled to zero terminal SNR"
    return (f"{info['name']}: {info['scheduler']}, {betas}, T={info['num_train_timesteps']}, "
            f"{info['prediction_type']}, {info['timestep_spacing']} spacing")


def summary_lines(info: dict[str, Any]) -> list[str]:
    ts = info["sampling_timesteps"]
    shown = " ".join(map(str, ts)) if len(ts) <= 12 else " ".join(map(str, ts[:6])) + " … " + " ".join(map(str, ts[-3:]))
    flag = "" if info["first_timestep_is_terminal"] else f"   ← starts at {ts[0]}, not T−1={info['terminal_t']}"
    sampler = info["scheduler_name"] or info["scheduler"]
    return [
        f"terminal SNR (t={info['terminal_t']}): {_num(info['terminal_snr'], '.4g')}   "
        f"log-SNR {_num(info['terminal_log_snr'], '.3f')}   α {_num(info['terminal_signal_scale'], '.4f')}   "
        f"σ {_num(info['terminal_noise_scale'], '.4f')}",
        f"sampling ({sampler}, {info['steps']} steps, {len(ts)} timesteps): {shown}{flag}",
    ]


def training_lines(info: dict[str, Any]) -> list[str]:
    """--training: where training draws its timesteps and how much each range counts."""
    tr = info["training"]
    how = tr["sampling"] + (f" (m={tr['logit_mean']:g}, s={tr['logit_std']:g})" if tr["sampling"] == "logit-normal"
                            else f" (scale {tr['mode_scale']:g})" if tr["sampling"] == "mode" else "")
    weight = tr["weighting"] + (f" γ={tr['snr_gamma']:g}" if tr["snr_gamma"] is not None else "")
    axis = "σ·T" if tr["axis"] == "sigma*T" else "t"
    lines = [f"{info['name']}: training draws {how}, loss weight {weight} ({tr['draws']:,} draws, seed {tr['seed']})",
             f"  {axis + ' range':>13}  {'share':>6}  {'mean weight':>11}  {'emphasis':>8}"]
    for b in tr["bins"]:
        bar = "█" * round(b["emphasis"] * 50)
        lines.append(f"  {b['from']:6.0f}–{b['to']:<6.0f}  {b['share']:6.1%}  {_num(b['weight'], '11.4g')}  "
                     f"{b['emphasis']:8.1%} {bar}")
    return lines


def write_table(infos: Sequence[dict[str, Any]], out: TextIO | None = None) -> None:
    """One rich table for all schedules (a section each), then each schedule's summary."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    out = out or sys.stdout
    # Piped output gets a fixed width wide enough for every column instead of rich's 80.
    console = Console(file=out, width=None if out.isatty() else 110, highlight=False, soft_wrap=True)
    if all("training" in info for info in infos):
        for info in infos:
            console.print(*training_lines(info), sep="\n")
        return
    many = len(infos) > 1
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=None if many else headline(infos[0]), title_justify="left")
    if many:
        table.add_column("schedule")
    columns = [c for c in TABLE if c[0] in _present(infos, [key for key, _, _ in TABLE])]
    families = {info["family"] for info in infos}
    names = SCALE_HEADERS.get(families.pop(), {}) if len(families) == 1 else {}
    for key, header, _ in columns:
        table.add_column(names.get(key, header), justify="right")
    for i, info in enumerate(infos):
        if i:
            table.add_section()
        for r in info["rows"]:
            table.add_row(*([info["name"]] if many else []), *(_cell(r, key, fmt) for key, _, fmt in columns))
    console.print(table)
    for info in infos:
        console.print(("\n" + headline(info)) if many else "", *summary_lines(info), sep="\n")


def write_csv(infos: Sequence[dict[str, Any]], out: TextIO | None = None) -> None:
    """Rows only, full precision; log_snr of a zero SNR is the text -inf, which float() reads.

    A column a shown family lacks stays empty for that family's rows. With --training, the bins.
    """
    out = out or sys.stdout
    writer = csv.writer(out, lineterminator="\n")
    if all("training" in info for info in infos):
        writer.writerow(("schedule", "axis", "from", "to", "share", "weight", "emphasis"))
        for info in infos:
            tr = info["training"]
            for b in tr["bins"]:
                writer.writerow([info["name"], tr["axis"]] + [repr(b[k]) for k in ("from", "to", "share", "weight",
                                                                                   "emphasis")])
        return
    columns = _present(infos, COLUMNS)
    writer.writerow(["schedule"] + columns)
    for info in infos:
        for r in info["rows"]:
            values = (r.get(c, "") for c in columns)
            writer.writerow([info["name"]] + [repr(v) if isinstance(v, float) else v for v in values])


def to_json(infos: Sequence[dict[str, Any]], outputs: dict[str, str] | None = None) -> str:
    """One schedule: its object. Several (--compare): {"schedules": [...]}. Non-finite numbers are null."""
    doc: dict[str, Any] = dict(infos[0]) if len(infos) == 1 else {"schedules": list(infos)}
    if outputs:
        doc["outputs"] = outputs
    return json.dumps(jsonable(doc), indent=2, allow_nan=False, ensure_ascii=False)


# ---------------------------------------------------------------- files


def check_output(path: Path, suffixes: Sequence[str], flag: str, overwrite: bool) -> Path:
    """Refuse a bad output path before any work is done."""
    from sdcli.images import check_new_file

    path = Path(path).expanduser()
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: the file name must end in {', '.join(suffixes)}")
    return check_new_file(path, overwrite, flag)


def _save(path: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Write through a temporary name and rename into place (``sdcli.images.atomic_write``), making the folder."""
    from sdcli.images import atomic_write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(Path(path), write, overwrite)


def _provenance(schedules: Sequence[Schedule], **extra: Any) -> str:
    """What made a figure, as the JSON its PNG "sdcli" text chunk holds (every output says how it was made)."""
    return json.dumps(jsonable({"sdcli": __version__, **extra,
                                "schedules": [{"name": s.label, "config": s.config, "scheduler": s.scheduler_name}
                                              for s in schedules]}))


# ---------------------------------------------------------------- plot


def _plot_training(infos: Sequence[dict[str, Any]], axes: Any) -> None:
    """--training: the share of draws and the emphasis (share × weight) per timestep range, one line per schedule."""
    ax_share, ax_emph = axes
    for info in infos:
        tr = info["training"]
        edges = [b["from"] for b in tr["bins"]] + [tr["bins"][-1]["to"]]
        label = f"{info['name']} ({tr['sampling']}, {tr['weighting']})"
        ax_share.stairs([b["share"] for b in tr["bins"]], edges, label=label, lw=1.6)
        ax_emph.stairs([b["emphasis"] for b in tr["bins"]], edges, label=label, lw=1.6)
    ax_share.set(xlabel="timestep (DDPM t, flow matching σ·T)", ylabel="share of training draws",
                 title="where training puts its timesteps")
    ax_emph.set(xlabel="timestep (DDPM t, flow matching σ·T)", ylabel="share × mean loss weight, normalised",
                title="how much each range counts (emphasis)")
    for ax in axes:
        ax.grid(alpha=0.3)
    ax_share.legend(fontsize=8)


def plot(schedules: Sequence[Schedule], infos: Sequence[dict[str, Any]], path: Path, overwrite: bool = False) -> Path:
    """α_t, σ_t and log-SNR against t, one colour per schedule; dots mark the timesteps the sampler visits.
    With --training: where training draws its timesteps and how much each range counts."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window; safe on headless machines
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_scale, ax_snr) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    if all("training" in info for info in infos):
        _plot_training(infos, (ax_scale, ax_snr))
        return _write_figure(fig, schedules, path, overwrite)
    lowest = 0.0
    for schedule, info in zip(schedules, infos):
        p = schedule.process
        alpha, sigma = p.signal_scale.numpy(), p.noise_scale.numpy()
        lsnr = p.log_snr().numpy().copy()
        t = np.arange(len(alpha))
        lsnr[~np.isfinite(lsnr)] = np.nan  # log-SNR −∞ (zero terminal SNR) has no point to draw
        lowest = min(lowest, float(np.nanmin(lsnr)))
        (line,) = ax_scale.plot(t, alpha, label=schedule.label, lw=1.6)
        ax_scale.plot(t, sigma, lw=1.2, ls="--", color=line.get_color())
        ax_snr.plot(t, lsnr, lw=1.6, color=line.get_color(), label=schedule.label)
        visits = visited_t(schedule, info)
        ax_snr.plot(visits, lsnr[visits], "o", ms=2.5, color=line.get_color())
        if info["terminal_snr"] == 0:
            ax_snr.annotate("→ −∞", (t[-1], lsnr[-2]), textcoords="offset points", xytext=(-28, -4),
                            color=line.get_color(), fontsize=8)
    ax_scale.set(xlabel="training timestep t", ylabel="scale", ylim=(0, 1.02),
                 title="signal scale α_t (solid) and noise scale σ_t (dashed)")
    ax_snr.set(xlabel="training timestep t", ylabel="log SNR = log(α_t² / σ_t²)",
               title=f"log-SNR (dots: where each sampler steps, {infos[0]['steps']} steps)", ylim=(lowest - 1, None))
    for ax in (ax_scale, ax_snr):
        ax.grid(alpha=0.3)
    ax_scale.legend(fontsize=8)
    return _write_figure(fig, schedules, path, overwrite)


def _write_figure(fig: Any, schedules: Sequence[Schedule], path: Path, overwrite: bool) -> Path:
    import matplotlib.pyplot as plt

    meta = {"Software": f"sdcli {__version__}", "sdcli": _provenance(schedules)}
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix != "png":
        meta = {"Creator": meta["Software"]} if suffix == "pdf" else {}
    try:
        return _save(path, lambda tmp: fig.savefig(tmp, format=suffix, dpi=110, metadata=meta), overwrite)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------- forward process on a picture


def fitted_size(image_size: tuple[int, int], size: int) -> tuple[int, int]:
    """An image of ``image_size`` fitted inside size×size, sides a multiple of 8 (every VAE's factor divides 8)."""
    scale = size / max(image_size)
    w, h = (max(8, int(round(s * scale)) // 8 * 8) for s in image_size)
    return w, h


def load_image(path: Path, size: int):
    """``path`` as a (1, 3, H, W) float tensor in [−1, 1], fitted inside size×size (`fitted_size`)."""
    import numpy as np
    import torch
    from PIL import Image

    from sdcli.images import open_image

    img = open_image(path, what="--image")
    img = img.resize(fitted_size(img.size, size), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return x.unsqueeze(0).contiguous()


def load_vae(model: str, revision: str | None = None, device: str = "cpu"):
    """Only the VAE of ``model`` (no UNet, no text encoders), in float32 on ``device``."""
    from diffusers import AutoencoderKL

    from sdcli.configs import local_kind
    from sdcli.schedule.core import _quiet_diffusers

    kind = local_kind(model)
    if kind == "file":
        raise ModelError(f"--latent needs a diffusers folder or Hub id with a vae/ subfolder, not the file {model}")
    _quiet_diffusers()
    source = str(Path(model).expanduser()) if kind == "folder" else model
    try:
        # Safetensors only: inspect-schedule has no --allow-pickle, and a pickled .bin can run code when loaded.
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", revision=revision, use_safetensors=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is "this model has no usable VAE"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"cannot load the VAE of {model}: {first[:300]}") from None
    return vae.to(device).eval()


def encode(vae, x):
    """Image in [−1, 1] → the latent the UNet is trained on: the posterior mean (`sdcli.latents`)."""
    from sdcli import latents

    return latents.encode(vae, x)


def decode(vae, z):
    """Latents → pixels on the CPU, clipped to [−1, 1] for display (`sdcli.latents`)."""
    from sdcli import latents

    return latents.decode(vae, z).float().clamp(-1, 1).cpu()


def noised(schedule: Schedule, x0, timesteps: Sequence[int], noise):
    """x_t for each t in one closed-form jump from x0 (same ε for every t, so only the schedule differs)."""
    ts = list(timesteps)
    # One (α, σ) pair per frame, broadcast over channels and pixels, in x0's dtype as add_noise does.
    alpha, sigma = (scale[ts].to(x0.dtype).reshape(-1, 1, 1, 1)
                    for scale in (schedule.process.signal_scale, schedule.process.noise_scale))
    return q_sample(x0, alpha, sigma, noise)


def to_pil(x):
    """(3, H, W) tensor in [−1, 1] → PIL image; x_t outside [−1, 1] (it is, early on) is clipped for display."""
    from PIL import Image

    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def strip(rows: Sequence[tuple[str, Sequence[Any], Sequence[str]]], title: str):
    """A labelled grid (`sdcli.images.labelled_grid`): one row per schedule (label, tiles, captions),
    one column per timestep; the row labels only when there is more than one row."""
    from sdcli.images import labelled_grid

    labels = [label for label, _, _ in rows] if len(rows) > 1 else []
    return labelled_grid([tiles for _, tiles, _ in rows], row_labels=labels, title=title,
                         captions=[captions for _, _, captions in rows])


def forward_strip(
    schedules: Sequence[Schedule],
    image: Path,
    timesteps: Sequence[int],
    out: Path,
    *,
    seed: int = 0,
    size: int = 256,
    vae: Any = None,
    model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the strip of x_t for ``image`` at ``timesteps``, one row per schedule (in latent space if ``vae``)."""
    import torch
    from PIL.PngImagePlugin import PngInfo

    # 1. The clean sample x_0: pixels, or the VAE latent of them
    x0 = load_image(image, size)
    if vae is not None:
        x0 = encode(vae, x0).cpu()
    # 2. One seeded ε shared by every schedule and timestep
    noise = torch.randn(x0.shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=x0.dtype)
    # 3. Jump to each x_t, decode if latent, caption
    rows = []
    for schedule in schedules:
        xt = noised(schedule, x0, timesteps, noise)
        pixels = decode(vae, xt) if vae is not None else xt
        process = schedule.process
        snrs = process.snr()
        captions = [f"t = {t}  SNR={_num(float(snrs[t]), '.3g')}\n"
                    f"α={float(process.signal_scale[t]):.3f}  σ={float(process.noise_scale[t]):.3f}" for t in timesteps]
        rows.append((schedule.label, [to_pil(p) for p in pixels], captions))
    space = f"latent space of {model}" if vae is not None else "pixel space"
    title = f"x_t = α_t·x_0 + σ_t·ε   ({space}, seed {seed})"
    sheet = strip(rows, title)
    info = PngInfo()
    info.add_text("Software", f"sdcli {__version__}")
    info.add_text("sdcli", _provenance(schedules, image=str(image), timesteps=list(timesteps), seed=seed,
                                              latent=vae is not None, model=model))
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(Path(out).suffix.lower(), "PNG")
    return _save(out, lambda tmp: sheet.save(tmp, format=fmt, **({"pnginfo": info} if fmt == "PNG" else {})),
                        overwrite)

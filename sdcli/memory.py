"""Will a request fit in memory? Estimated before anything heavy loads, and refused in one line if not.

Without this, `generate --width 100000 --height 100000` or `inspect-schedule --size 100000`
grows until the kernel kills the process: no message, and no exit code a script can read.
The estimate counts what the request's size decides (latents, the UNet's activations and
attention, the VAE's decode, the pictures) and, for a local pipeline folder, its weights as
each quantization, storage and offload mode holds them (`weights_bytes`, from the safetensors
headers): it catches the impossible, names the --quantize that would make a request fit, and a
request near the limit can still fail. Its constants were
measured on CPU with diffusers 0.42 and Stable Diffusion 1.5's architecture (random weights,
float32); each says what it stands for. A model's figures come from its family (`sdcli.families`:
its ``arch``). ``SDCLI_MEMORY_CHECK=0`` skips the check.

Pure arithmetic (`Arch`, `generation_need`, `strip_need`) is apart from what it is compared
with (`available_bytes`), so tests can ask about any size without allocating it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sdcli.errors import ResourceError

SKIP_ENV = "SDCLI_MEMORY_CHECK"  # "0" skips the check (an estimate can be wrong; swap is not counted)

# Values held per pixel, in units of the first level's channels (block_out_channels[0]), at the peak:
# the VAE decoder's last levels run at full resolution with a 2x-upsampled 256-channel input, skip
# tensors and GroupNorm copies alive together (SD's VAE: 973 x 4 bytes a pixel measured at 1024x1024,
# 1034 at 512; its encoder 671), and the UNet keeps every level's skip connections for the way up
# plus a feed-forward 8x wide (22 per latent pixel per image measured between 256 and 512 pixels).
VAE_VALUES = 8
UNET_VALUES = 24
# The latents, the doubled model input, the two noise predictions and the scheduler's previous sample.
LATENT_COPIES = 6
# A decoded image as float32 from the VAE, its float32 numpy copy, and the 8-bit PIL image: 3 x (4 + 4 + 1).
IMAGE_BYTES = 27
# A decoded init image (RGBA at worst), its RGB copy and its resized copy, per source pixel.
LOAD_BYTES = 10


@dataclass(frozen=True)
class Arch:
    """What the estimate needs to know of a model, read from its unet/ and vae/ configs; SD 1.5's when unknown."""

    vae_factor: int = 8  # pixels per latent pixel: 2^(levels of the VAE - 1)
    latent_channels: int = 4
    vae_channels: int = 128  # the VAE's block_out_channels[0]: its width at full resolution
    vae_tile: int = 512  # the VAE's sample_size: the tile --vae-tiling decodes at a time
    vae_upcast: bool = False  # SDXL pipelines decode in float32 when the VAE asks (force_upcast)
    unet_channels: int = 320  # the UNet's block_out_channels[0]: its width at the latent's resolution
    attention_level: int | None = 0  # the first UNet level with attention (each level halves the side)
    attention_heads: int = 8  # the heads at that level
    sample_size: int = 64  # the UNet's latent side at the model's own size


@dataclass
class Need:
    """An estimate: the peak in bytes and what it is made of (the largest term names what to shrink)."""

    total: int
    terms: dict[str, int]

    def largest(self) -> tuple[str, int]:
        return max(self.terms.items(), key=lambda kv: kv[1])


def _first(value: Any, default: int) -> int:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else default
    return int(value) if isinstance(value, (int, float)) and value else default


def unet_arch(unet: dict[str, Any], vae: dict[str, Any], upcast: bool = False) -> Arch:
    """`Arch` of a UNet family from the configs' dicts (diffusers' names); a missing key keeps SD 1.5's value.
    ``upcast``: the family's pipelines decode in float32 where the VAE asks (SDXL's force_upcast)."""
    from sdcli.configs import vae_factor

    d = Arch()
    vae_blocks = vae.get("block_out_channels") or [d.vae_channels] * 4
    down = unet.get("down_block_types")
    level = d.attention_level if down is None else next((i for i, t in enumerate(down) if "Attn" in t), None)
    # diffusers' UNet config calls SD's head count attention_head_dim (a historical misnomer);
    # num_attention_heads, where set, is the head count.
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim") or d.attention_heads
    if isinstance(heads, (list, tuple)):
        heads = heads[level or 0] if heads else d.attention_heads
    return Arch(
        vae_factor=vae_factor(vae) if vae else d.vae_factor,
        latent_channels=_first(vae.get("latent_channels"), d.latent_channels),
        vae_channels=_first(vae_blocks, d.vae_channels),
        vae_tile=_first(vae.get("sample_size"), d.vae_tile),
        vae_upcast=upcast and vae.get("force_upcast", True) is not False,
        unet_channels=_first(unet.get("block_out_channels"), d.unet_channels),
        attention_level=level,
        attention_heads=int(heads),
        sample_size=_first(unet.get("sample_size"), d.sample_size),
    )


# ---------------------------------------------------------------- the weights


@dataclass(frozen=True)
class Params:
    """One model of a pipeline, from its safetensors headers: the weights of linear layers (2-D, what quantization
    and float8 storage shrink) and every other parameter (convolutions, norms, biases)."""

    linear: int
    other: int
    castable: int = 0  # linear weights float8 storage casts: not in norms or embeddings (diffusers skips those)


# diffusers' layerwise casting leaves these modules in the compute dtype (`DEFAULT_SKIP_MODULES_PATTERN`).
_KEPT_BY_CASTING = ("pos_embed", "patch_embed", "norm", "proj_in", "proj_out")


def _header_params(files: list[Path]) -> Params:
    linear = other = castable = 0
    for file in files:
        try:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
        except (OSError, ValueError):
            continue
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            n = math.prod(info.get("shape") or [1])
            if len(info.get("shape") or []) == 2 and name.endswith("weight"):
                linear += n
                module = name.rsplit(".", 1)[0]
                castable += 0 if any(k in module for k in _KEPT_BY_CASTING) else n
            else:
                other += n
    return Params(linear, other, castable)


def model_params(model: str) -> dict[str, Params]:
    """Each model of a local pipeline folder (its model_index.json's names), counted from the safetensors headers
    alone; {} for a Hub id or a single file, whose weights are not on disk to count (their weights go uncounted)."""
    from sdcli.configs import config_or_empty

    folder = Path(model).expanduser()
    index = config_or_empty(model, "model_index.json", None) if folder.is_dir() else {}
    found = {}
    for name, value in index.items():
        if isinstance(value, list) and (folder / name).is_dir():
            files = sorted((folder / name).glob("*.safetensors"))
            if files:
                found[name] = _header_params(files)
    return found


def weights_bytes(params: dict[str, Params], *, nbytes: int, denoiser: str = "unet",
                  text_encoders: tuple[str, ...] = (), quantize: Any = None, quantize_text_encoder: bool = False,
                  denoiser_file_bytes: int | None = None, storage_float8: bool = False, offload: str | None = None,
                  denoiser_from_file: bool = False) -> int:
    """The bytes the weights hold on the device: each model's linear weights at ``quantize``'s bytes a weight
    (`sdcli.quantize.Mode`) where it quantizes them (not a denoiser ``denoiser_from_file``: a safetensors file
    loads unquantized), one byte with float8 storage, ``nbytes`` otherwise; a GGUF denoiser its file's size.
    Offloaded, only what is on the GPU at once: the largest model (model offload), or next to nothing (sequential
    and group offloading move a layer at a time)."""
    sizes = {}
    for name, p in params.items():
        if name == denoiser and denoiser_file_bytes is not None:
            sizes[name] = denoiser_file_bytes
            continue
        quantized = quantize is not None and ((name == denoiser and not denoiser_from_file)
                                              or (quantize_text_encoder and name in text_encoders))
        if quantized:
            sizes[name] = int(p.linear * quantize.bytes_per_weight + p.other * nbytes)
        elif storage_float8 and name == denoiser:
            sizes[name] = int(p.castable + (p.linear - p.castable + p.other) * nbytes)
        else:
            sizes[name] = (p.linear + p.other) * nbytes
    if offload in ("sequential", "group"):
        return 0
    if offload == "model":
        return max(sizes.values(), default=0)
    return sum(sizes.values())


# ---------------------------------------------------------------- the arithmetic


def attention_scores(tokens: int, rows: int, nbytes: int) -> int:
    """Bytes of materialised attention: a tokens x tokens matrix per row (one head of one image),
    twice, since the scores and their softmax exist together for a moment."""
    return 2 * rows * tokens * tokens * nbytes


def generation_need(
    arch: Arch,
    width: int,
    height: int,
    *,
    batch: int = 1,
    guidance: bool = True,
    nbytes: int = 4,
    vae_tiling: bool = False,
    attention_slicing: bool = False,
    streams: bool = True,
    init_pixels: int = 0,
    weights: int = 0,
) -> Need:
    """The peak memory of generating ``batch`` images of width x height with ``arch``'s model.

    ``guidance``: classifier-free guidance doubles the UNet's batch. ``nbytes``: 2 for float16 and
    bfloat16, 4 for float32. ``streams``: torch's scaled_dot_product_attention never materialises
    the scores here (`sdpa_streams`). ``init_pixels``: the init image's own size, for img2img.
    ``weights``: the bytes of the weights on the device through every phase (`weights_bytes`).
    """
    f = arch.vae_factor
    lat_h, lat_w = math.ceil(height / f), math.ceil(width / f)
    unet_batch = batch * (2 if guidance else 1)
    latents = LATENT_COPIES * unet_batch * arch.latent_channels * lat_h * lat_w * 4
    unet = UNET_VALUES * arch.unet_channels * lat_h * lat_w * nbytes * unet_batch
    # Self-attention at the UNet's finest attention level k sees (H/f/2^k)(W/f/2^k) tokens.
    # diffusers' attention slicing ("auto") computes half the heads of one image at a time through
    # its own matmuls, scores included, even where torch's SDPA would have streamed them; without
    # slicing, SDPA materialises nothing on CUDA and recent CPU builds (a fused kernel), and
    # everything, every head of every image at once, where it falls back to its plain maths.
    scores = 0
    if arch.attention_level is not None:
        step = 2 ** arch.attention_level
        tokens = math.ceil(lat_h / step) * math.ceil(lat_w / step)
        if attention_slicing:
            rows = max(1, arch.attention_heads // 2)
        else:
            rows = 0 if streams else unet_batch * arch.attention_heads
        scores = attention_scores(tokens, rows, nbytes)
    # The VAE decodes each image at full resolution (with --vae-tiling: one tile of one image at a
    # time, as sdcli also turns on VAE slicing there); its middle block attends over every latent
    # pixel of what it decodes, with one head (attention slicing does not reach the VAE).
    vae_bytes = 4 if arch.vae_upcast and nbytes < 4 else nbytes
    tile_h, tile_w = (min(height, arch.vae_tile), min(width, arch.vae_tile)) if vae_tiling else (height, width)
    decoded_together = 1 if vae_tiling else batch
    vae = decoded_together * VAE_VALUES * arch.vae_channels * tile_h * tile_w * vae_bytes
    if not streams:
        vae += attention_scores(math.ceil(tile_h / f) * math.ceil(tile_w / f), decoded_together, vae_bytes)
    terms = {
        "latents": latents,
        "UNet activations": unet,
        "UNet attention scores": scores,
        "VAE decode": vae,
        "decoded images": batch * width * height * IMAGE_BYTES,
        "init image": init_pixels * LOAD_BYTES,
        "weights": weights,
    }
    # The phases follow one another; only the latents (and the weights) live through all of them.
    peak = weights + latents + max(unet + scores, vae + terms["decoded images"], terms["init image"])
    return Need(peak, {k: v for k, v in terms.items() if v})


def strip_need(width: int, height: int, frames: int, rows: int, *, source_pixels: int = 0,
               vae: Arch | None = None) -> tuple[Need, Need | None]:
    """inspect-schedule's strip of ``rows`` x ``frames`` tiles of width x height: (pixels, VAE) needs.

    The pixel side: x_0 and ε as float32 RGB, each row's frames as x_t plus its two products
    (α·x_0, σ·ε), the tiles as 8-bit RGB, and the sheet that holds them all (plus a copy while
    saving). The VAE side (--latent, float32): one encode, then every frame of a row decoded at once.
    """
    pixels = width * height
    terms = {
        "source image": source_pixels * LOAD_BYTES,
        "x_t tensors": pixels * 3 * 4 * (2 + 3 * frames),
        "tiles and sheet": rows * frames * pixels * 3 * 3,
    }
    pixel_need = Need(sum(terms.values()), terms)
    if vae is None:
        return pixel_need, None
    decode = frames * VAE_VALUES * vae.vae_channels * pixels * 4
    return pixel_need, Need(decode, {"VAE decode": decode})


# ---------------------------------------------------------------- what is free


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """Room left under a container's memory limit (cgroup v2, then v1), its page cache counted as free;
    None without a limit."""
    for limit_file, usage_file, stat_key in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "inactive_file"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
         "total_inactive_file"),
    ):
        try:
            limit_text = Path(limit_file).read_text().strip()
            if limit_text == "max" or int(limit_text) >= 1 << 60:
                return None
            used = int(Path(usage_file).read_text())
            stats = dict(line.split() for line in Path(limit_file).with_name(
                "memory.stat").read_text().splitlines() if len(line.split()) == 2)
            return max(0, int(limit_text) - used + int(stats.get(stat_key, 0)))
        except (OSError, ValueError):
            continue
    return None


def ram_available() -> int | None:
    """What the OS can hand out without swapping: MemAvailable (Linux), else psutil (installed with accelerate),
    capped by a container's limit; None where none of them answers."""
    found = _meminfo_available()
    if found is None:
        try:
            import psutil

            found = int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001 - no way to know: no check
            found = None
    known = [x for x in (found, _cgroup_room()) if x is not None]
    return min(known) if known else None


def available_bytes(device: str) -> int | None:
    """Memory free for the request on ``device``: CUDA's free memory on that GPU, else RAM (MPS shares it).

    On CUDA that is the driver's free memory plus what torch's caching allocator holds unused in this
    process (a finetune rendering validation images has a large such pool, which the driver counts as used).
    """
    if device.startswith("cuda"):
        import torch

        gpu = torch.device(device)
        free, _total = torch.cuda.mem_get_info(gpu)
        return int(free + torch.cuda.memory_reserved(gpu) - torch.cuda.memory_allocated(gpu))
    return ram_available()


def sdpa_streams(device: str, nbytes: int, head_dim: int = 64) -> bool:
    """Whether torch's scaled_dot_product_attention avoids materialising the scores on ``device``.

    On CUDA the flash and memory-efficient kernels do. On CPU torch picks per call: asked here
    (torch._fused_sdp_choice) for a typical self-attention shape, and any answer but its plain
    maths path streams (torch >= 2.2 has a fused CPU kernel). MPS counts as materialising.
    """
    import torch

    if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        return False
    if device.startswith("cuda"):
        return True
    if device != "cpu":
        return False
    try:
        dtype = torch.float32 if nbytes == 4 else torch.bfloat16
        q = torch.empty(1, 8, 16, head_dim, dtype=dtype)
        return int(torch._fused_sdp_choice(q, q, q)) != 0  # 0: SDPBackend.MATH
    except Exception:  # noqa: BLE001 - a private API: unknown means materialising
        return False


# ---------------------------------------------------------------- refusing


def human(n: int) -> str:
    """Bytes as one short number: 512 MB, 2.6 GB, 37 TB."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"
    return f"{max(1, n >> 10)} KB"


def largest_fit(need: Callable[[int, int], int], width: int, height: int, factor: int,
                available: int) -> tuple[int, int] | None:
    """The largest width x height of the same shape, multiples of ``factor``, whose need fits; None if none does."""
    def size(scale: float) -> tuple[int, int]:
        return max(factor, int(width * scale) // factor * factor), max(factor, int(height * scale) // factor * factor)

    if need(*size(0.0)) > available:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if need(*size(mid)) <= available else (lo, mid)
    return size(lo)


def skipped() -> bool:
    return os.environ.get(SKIP_ENV, "").strip().lower() in ("0", "false", "no", "off")


def refuse(what: str, need: Need, device: str, available: int, helps: list[str]) -> None:
    """Raise the one-line ResourceError: the estimate, its largest part, what is free, and what would help."""
    part, size = need.largest()
    raise ResourceError(
        f"{what} needs about {human(need.total)} of memory (the {part}: {human(size)}), and {device} has "
        f"{human(available)} free; {'; '.join(helps)} (or {SKIP_ENV}=0 to try anyway)")


def _dtype_bytes(dtype: Any, device: str) -> int:
    dtype = getattr(dtype, "value", dtype)
    if dtype in (None, "auto"):
        return 2 if device.startswith("cuda") else 4  # as sdcli.pipeline.resolve_dtype picks
    return 4 if dtype == "float32" else 2


def _device(name: Any) -> str:
    from sdcli.devices import resolve_device

    device = resolve_device(getattr(name, "value", name) or "auto")
    if device == "cuda" and os.environ.get("LOCAL_RANK", "").isdigit():
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # each process of a multi-GPU run has its own card
    return device


# ---------------------------------------------------------------- the commands' checks


def _render_size(s: Any, arch: Arch, factor: int) -> tuple[int, int, int]:
    """(width, height, init image pixels) generate will render at, as `sdcli.generation.tasks` settles them.

    An init image's size comes from its header (the pixel cap applies here too, before any model
    loads); where one side is asked and the other follows the image, its longer side is assumed.
    """
    init_pixels = 0
    # Without -W/-H a ControlNet text-to-image takes its size from its first control image.
    source, what, setting = getattr(s, "init_image", None), "--init-image", "init_image"
    if not source and getattr(s, "controlnets", None) and getattr(s, "control_images", None):
        source, what, setting = s.control_images[0], "--control-image", "control_images"
    if source:  # a path, or a PIL image given in memory
        from sdcli.images import image_size

        iw, ih = image_size(source, what=what, setting=setting)
        init_pixels = iw * ih
        if s.width and s.height:
            width, height = s.width, s.height
        elif s.width or s.height:
            width, height = s.width or max(iw, ih), s.height or max(iw, ih)
        else:
            width, height = iw - iw % factor, ih - ih % factor
    else:
        side = arch.sample_size * arch.vae_factor
        width, height = s.width or side, s.height or side
    outpaint = getattr(s, "outpaint", None)
    if outpaint:
        left, right, top, bottom = outpaint
        width, height = width + left + right, height + top + bottom
    scale = getattr(s, "hires_scale", None)
    if scale:  # the second pass, at the enlarged size, is the larger
        width, height = int(width * scale) // factor * factor, int(height * scale) // factor * factor
    return max(factor, width), max(factor, height), init_pixels


def check_generation(s: Any, arch: Arch, family: Any = None) -> None:
    """Refuse with a ResourceError a `generate` request (`Settings`) whose estimate exceeds what its device has free;
    ``arch`` is its model's (`sdcli.families.model_arch`), ``family`` its family (whose denoiser and text encoders
    quantization shrinks; without it the weights go uncounted)."""
    if skipped():
        return
    factor = max(8, arch.vae_factor)
    width, height, init_pixels = _render_size(s, arch, factor)
    device = _device(s.device)
    available = available_bytes(device)
    if available is None:
        return
    per_seed = len(s.seeds) if s.seeds and len(s.seeds) > 1 else s.num_images
    guidance = s.guidance or [7.5]  # unset: the classifier-free default
    images = max(1, len(s.prompts) * len(guidance) * max(1, len(s.guidance_rescale)) * per_seed)
    nbytes = _dtype_bytes(s.dtype, device)
    weighed = _weighing(s, device, nbytes, family)
    options = dict(batch=min(s.batch_size, images), guidance=any(g != 1 for g in guidance), nbytes=nbytes,
                   vae_tiling=s.vae_tiling, attention_slicing=s.attention_slicing,
                   streams=sdpa_streams(device, nbytes), init_pixels=init_pixels, weights=weighed())

    def need(w: int, h: int, **changes: Any) -> Need:
        return generation_need(arch, w, h, **{**options, **changes})

    asked = need(width, height)
    if asked.total <= available:
        return
    # 1. Switches that lower this estimate (attention slicing only does where SDPA materialises).
    helps = []
    for flag, changes in (("--vae-tiling", {"vae_tiling": True}), ("--attention-slicing", {"attention_slicing": True}),
                          ("--batch-size 1", {"batch": 1})):
        key = next(iter(changes))
        if options[key] != changes[key]:
            lower = need(width, height, **changes).total
            if lower < asked.total:
                helps.append(f"{flag} needs {human(lower)}")
    # 2. Without quantization: the first --quantize (least rounding first) that makes it fit.
    from sdcli import quantize as q

    if not getattr(s, "quantize", None) and not q.model_is_gguf(getattr(s, "denoiser_file", None)):
        for kind in ("int8-weight", "nf4", "int4-weight"):
            mode = q.resolve(kind, device)
            if mode.cuda_only and not device.startswith("cuda"):
                continue
            lower = need(width, height, weights=weighed(mode)).total
            if lower <= available:
                helps.insert(0, f"--quantize {kind} needs {human(lower)}")
                break
    # 3. The largest size of the same shape that fits as asked.
    fit = largest_fit(lambda w, h: need(w, h).total, width, height, factor, available)
    helps.append(f"about {fit[0]}x{fit[1]} fits as asked" if fit else "no size fits as asked")
    batch = f" x{options['batch']} at once" if options["batch"] > 1 else ""
    refuse(f"generating {width}x{height}{batch}", asked, device, available, helps)


def _weighing(s: Any, device: str, nbytes: int, family: Any) -> Callable[..., int]:
    """mode -> the weights' bytes on ``device`` for request ``s`` (its own --quantize when no mode is given)."""
    from sdcli import quantize as q

    params = model_params(s.model) if s.model and family is not None else {}
    spec, file = getattr(s, "quantize", None), getattr(s, "denoiser_file", None)
    own = q.resolve(spec, device) if spec else None
    offload = getattr(s, "offload", None) or ("model" if getattr(s, "cpu_offload", False) else None)
    # A GGUF denoiser stays quantized (its file's size); a safetensors one loads in --dtype, as the base's would.
    gguf_bytes = Path(file).stat().st_size if file and q.model_is_gguf(file) and Path(file).is_file() else None

    def weighed(mode: Any = None) -> int:
        if not params or family is None:
            return 0
        return weights_bytes(params, nbytes=nbytes, denoiser=family.denoiser, text_encoders=family.text_encoders,
                             quantize=mode or own, quantize_text_encoder=getattr(s, "quantize_text_encoder", False),
                             denoiser_file_bytes=gguf_bytes, denoiser_from_file=bool(file),
                             storage_float8=bool(getattr(s, "storage_dtype", None)), offload=offload)

    return weighed


def check_strip(image: Path, size: int, frames: int, rows: int,
                fitted: Callable[[tuple[int, int], int], tuple[int, int]], arch: Arch | None = None,
                device: Any = "auto") -> None:
    """Refuse an inspect-schedule strip (``rows`` x ``frames`` tiles of ``image`` fitted in ``size``) that cannot fit.

    ``fitted(stored size, size)`` is the strip's own rule for a tile's size. With ``arch`` (--latent: the VAE's
    model, `sdcli.families.model_arch`) the VAE's share is compared with the GPU's memory when it runs on one,
    and with RAM otherwise.
    """
    from sdcli.images import image_size

    stored = image_size(image, what="--image")  # also refuses a missing, unreadable or oversized file now
    if skipped():
        return
    device = _device(device) if arch is not None else "cpu"

    def needs(side: int) -> dict[str, Need]:
        pixels, vae = strip_need(*fitted(stored, side), frames, rows, source_pixels=stored[0] * stored[1], vae=arch)
        if vae is None:
            return {"cpu": pixels}
        if not device.startswith("cuda"):
            return {"cpu": Need(pixels.total + vae.total, {**pixels.terms, **vae.terms})}
        return {"cpu": pixels, device: vae}

    width, height = fitted(stored, size)
    for where, need in needs(size).items():
        available = available_bytes(where)
        if available is None or need.total <= available:
            continue
        fit = largest_fit(lambda side, _: needs(side)[where].total, size, size, 8, available)
        helps = [f"--size {fit[0]} fits" if fit else "no --size fits"]
        if frames > 1:
            helps.append(f"fewer --at timesteps than {frames}")
        refuse(f"--size {size} ({rows} x {frames} tiles of {width}x{height})", need, where, available, helps)


# ---------------------------------------------------------------- finetune

# Training keeps the forward pass's activations for the backward pass: measured against one inference
# forward's peak (`UNET_VALUES`), about this many times as much at once (gradient checkpointing keeps
# only each block's input, then recomputes).
TRAIN_ACTIVATIONS = 4
CHECKPOINTED_ACTIVATIONS = 1
# Bytes per trained parameter beside its weight: its gradient (float32) and AdamW's two moments
# (float32, or one byte each with --use-8bit-adam); EMA keeps one more float32 copy.
GRAD_BYTES, ADAM_BYTES, ADAM_8BIT_BYTES, EMA_BYTES = 4, 8, 2, 4


def lora_layers(model: Any, targets: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(name, in, out) of each linear layer of ``model`` a LoRA on ``targets`` adapts (peft's rule: the module's
    name is a target or ends in "." + a target)."""
    import torch

    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            found.append((name, module.in_features, module.out_features))
    return found


def training_need(arch: Arch, side: int, *, batch: int, trained: int, new: int, nbytes: int = 4,
                  checkpointing: bool = False, adam_bytes: int = ADAM_BYTES, ema: bool = False) -> Need:
    """The memory one training step adds to the loaded pipeline, at ``side`` x ``side`` pixels (a bucket's
    area) and ``batch`` images: ``trained`` parameters' gradients, optimizer state (and EMA), ``new`` ones
    that did not exist when the pipeline loaded (LoRA's), the denoiser's activations kept for backward, and
    the VAE encoding a batch into latents (for the cache, or every step)."""
    f = arch.vae_factor
    lat = math.ceil(side / f) ** 2
    per_image = UNET_VALUES * arch.unet_channels * lat * nbytes
    activations = per_image * batch * (CHECKPOINTED_ACTIVATIONS if checkpointing else TRAIN_ACTIVATIONS)
    terms = {
        "new weights": new * 4,
        "gradients and optimizer state": trained * (GRAD_BYTES + adam_bytes + (EMA_BYTES if ema else 0)),
        "denoiser activations": activations,
        "VAE encode": batch * VAE_VALUES * arch.vae_channels * side * side * 4,
    }
    peak = terms["new weights"] + terms["gradients and optimizer state"] + max(activations, terms["VAE encode"])
    return Need(peak, {k: v for k, v in terms.items() if v})


def check_training(cfg: Any, pipe: Any, family: Any, device: str) -> None:
    """Refuse, before anything is encoded or trained, a finetune whose step cannot fit in ``device``'s free
    memory (ResourceError) or whose outputs cannot fit on the disk of --out (OutputError); a --rank past
    the adapted layers' sizes is refused as meaningless (UsageError)."""
    import shutil

    from sdcli.errors import OutputError, UsageError

    denoiser = getattr(pipe, family.denoiser)
    # 1. What trains: LoRA's rank x (in + out) per adapted layer, or every parameter of what trains in full.
    if cfg.lora:
        layers = lora_layers(denoiser, tuple(cfg.lora_targets))
        smallest = min(layers, key=lambda layer: min(layer[1], layer[2]), default=None)
        if smallest is not None and cfg.rank > min(smallest[1], smallest[2]):
            raise UsageError(f"--rank {cfg.rank} is larger than the {smallest[1]}x{smallest[2]} layer {smallest[0]} it "
                             f"adapts: a rank past a layer's smaller side adds weights but nothing they can learn; "
                             f"use at most {min(smallest[1], smallest[2])}")
        trained = new = sum(cfg.rank * (i + o) for _, i, o in layers)
    else:
        trained, new = sum(p.numel() for p in denoiser.parameters()), 0
    if cfg.train_text_encoder:  # its LoRA is small beside the denoiser's; in full, every weight trains
        extra = sum(p.numel() for _, e in family.encoders(pipe) for p in e.parameters())
        trained += 0 if cfg.lora else extra
    # 2. The files: the weights (twice with the kohya copy), and each kept checkpoint's weights and AdamW state.
    files = (new if cfg.lora else trained) * 4 * (2 if cfg.lora and cfg.lora_format == "both" else 1)
    if cfg.checkpoint_every:
        files += cfg.keep_checkpoints * trained * (4 + ADAM_BYTES)
    if skipped():
        return
    where = Path(cfg.out).resolve()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if files > free:
        raise OutputError(f"--out {cfg.out}: the weights and checkpoints need about {human(files)} and its disk has "
                          f"{human(free)} free; lower --rank or --keep-checkpoints (or {SKIP_ENV}=0 to try anyway)")
    # 3. One step's memory.
    available = available_bytes(device)
    if available is None:
        return
    arch = family.arch(dict(getattr(denoiser, "config", {})), dict(pipe.vae.config))
    from sdcli.distributed import shards

    # Under FSDP each process holds its shard of what trains: its weights, gradients and optimizer state.
    n = shards()
    trained, new = -(-trained // n), -(-new // n)
    options = dict(batch=cfg.batch_size, trained=trained, new=new, checkpointing=cfg.gradient_checkpointing,
                   nbytes=2 if cfg.mixed_precision in ("fp16", "bf16") else 4,
                   adam_bytes=ADAM_8BIT_BYTES if cfg.use_8bit_adam else ADAM_BYTES, ema=cfg.ema)
    side = max(cfg.resolutions)  # several --resolution sizes: the largest decides
    need = training_need(arch, side, **options)
    if need.total <= available:
        return
    helps = []
    one = training_need(arch, side, **{**options, "batch": 1}).total
    if cfg.batch_size > 1 and one < need.total:
        helps.append(f"--batch-size 1 needs {human(one)}")
    if not cfg.gradient_checkpointing:
        lower = training_need(arch, side, **{**options, "checkpointing": True}).total
        if lower < need.total:
            helps.append(f"--gradient-checkpointing needs {human(lower)}")
    fit = largest_fit(lambda w, h: training_need(arch, w, **options).total, side, side,
                      arch.vae_factor, available)
    helps.append(f"about --resolution {fit[0]} fits" if fit else "no --resolution fits")
    refuse(f"training at {side}x{side}" + (f" x{cfg.batch_size} a step" if cfg.batch_size > 1 else ""), need,
           device, available, helps)

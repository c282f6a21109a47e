"""Does caching latents and text embeddings pay? Run by hand (not a test):

    python benchmarks/finetune_bench.py                       # a small SD-shaped random pipeline, 128 px
    python benchmarks/finetune_bench.py --model PATH --resolution 512 --data DIR
    python benchmarks/finetune_bench.py --json out.json

Trains the same model on the same images with the same batch size two ways, each in a fresh process
(so peak memory is its own), interleaved, several runs each:

- sdcli: `sdcli.training.finetune` (LoRA by default), which encodes every image and caption once and
  then runs one UNet forward and backward per step;
- reference: the loop common training scripts run (diffusers' train_text_to_image_lora.py: on CUDA
  with --mixed_precision fp16, as sdcli's default), which sends every batch through the VAE encoder
  and the text encoder before the UNet. To favour the reference, its images are decoded and cropped
  once up front, so the only difference left is the encoders.

Prints training images/s (steps after the first two, median of the runs), peak memory (max RSS on
CPU; max allocated on CUDA), the time sdcli spent building its cache, and the ratio. Target: >= 1.5x
and no more memory.

    python benchmarks/finetune_bench.py --mixed-aspect          # aspect-ratio buckets against square crops

trains sdcli twice on one mixed-aspect folder (squares, 1:4 portraits and 4:1 landscapes), with
aspect-ratio buckets and with --no-buckets, interleaved. Every bucket it uses has exactly the square's
pixel count (128x128, 64x256 and 256x64 at 128 px), so the difference is the cost of buckets
themselves: per-example latents stacked each step, one size a batch. It also counts the images the
VAE encodes before the first step and during training, to show the cache is still built once.
Target: buckets cost under 5 % in images/s.

    python benchmarks/finetune_bench.py --adapters              # DoRA, LoHa, LoKr against LoRA

trains sdcli with each --adapter (lora, dora, loha, lokr) on the same data, interleaved, and prints each
one's images/s and its ratio to LoRA's from the same run.

    python benchmarks/finetune_bench.py --fsdp --method full    # FSDP2 against plain data parallel

launches `sdcli finetune` with `accelerate launch` on 2 processes (CPU: gloo) twice, interleaved: with an
accelerate config of distributed_type FSDP (fsdp_version 2: weights, gradients and optimizer state
sharded) and with plain data parallel (DDP: every process holds everything). Prints each one's training
images/s (from loss.csv, steps after the first two), the largest process's peak memory, and FSDP's ratio
to DDP from the same run. FSDP pays an all-gather per layer per forward and backward for holding half.

    python benchmarks/finetune_bench.py --deepspeed --method full   # DeepSpeed ZeRO-2 against plain data parallel

the same with distributed_type DEEPSPEED (zero_stage 2: gradients and Adam state partitioned, weights whole)
in place of FSDP, and ZeRO-2's ratio to DDP from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CAPTIONS = ["a red circle", "a blue square on a white background", "a green triangle in the corner",
            "a small yellow star", "a large purple circle at the top left", "an orange square and a gray star"]


def small_pipeline(folder: Path) -> str:
    """A random SD-1-shaped pipeline: an 8x VAE with 2 layers per level, a 3-level cross-attention UNet, a 4-layer CLIP."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdcli.testing import write_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(folder / "tok")))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1,
        pad_token_id=len(tokenizer) - 1))
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 128), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
        attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 128, 128), layers_per_block=2, in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        sample_size=128)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder / "pipe"), safe_serialization=True)
    return str(folder / "pipe")


def make_data(folder: Path, n: int, resolution: int) -> str:
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = int(resolution * 1.25), resolution
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y, r = rng.randrange(w), rng.randrange(h), rng.randrange(8, resolution // 3)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return str(folder)


def make_mixed_data(folder: Path, n: int, resolution: int) -> str:
    """A third each of squares, 1:4 portraits and 4:1 landscapes, a little larger than their buckets."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(resolution * 5 // 4, resolution * 5 // 4), (resolution * 5 // 8, resolution * 5 // 2),
              (resolution * 5 // 2, resolution * 5 // 8)]
    for i in range(n):
        w, h = shapes[i % 3]
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y, r = rng.randrange(w), rng.randrange(h), rng.randrange(8, min(w, h) // 2)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return str(folder)


def count_vae_images() -> dict:
    """Count the images the VAE encodes, by wrapping AutoencoderKL.encode for this process."""
    from diffusers import AutoencoderKL

    counts = {"images": 0}
    original = AutoencoderKL.encode

    def encode(self, x, *args, **kwargs):
        counts["images"] += x.shape[0]
        return original(self, x, *args, **kwargs)

    AutoencoderKL.encode = encode
    return counts


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def rates(stamps: list[tuple[float, float]], batch: int, skip: int = 2) -> dict:
    """Images per second from the median step after the first ``skip`` (warm-up), by wall clock and by CPU time.

    The median step shrugs off a step slowed by another process on a shared machine; CPU seconds
    per image (summed over threads) hardly depends on how busy the machine is.
    """
    wall = [b[0] - a[0] for a, b in zip(stamps[skip:], stamps[skip + 1:])]
    cpu = [b[1] - a[1] for a, b in zip(stamps[skip:], stamps[skip + 1:])]
    return {"images_per_s": batch / statistics.median(wall), "cpu_s_per_image": statistics.median(cpu) / batch}


ADAPTERS = ("lora", "dora", "loha", "lokr")


def run_sdcli(args, buckets: bool = True, adapter: str = "lora") -> dict:
    from sdcli.training import FinetuneConfig, finetune

    stamps: list[tuple[float, float]] = []
    encoded = count_vae_images()
    before_training: list[int] = []

    def on_step(info):
        stamps.append(stamp())
        if not before_training:
            before_training.append(encoded["images"])  # a cached step encodes nothing, so this is the cache's count

    t0 = time.perf_counter()
    result = finetune(
        FinetuneConfig(data=args.data, out=Path(args.work) / f"sdcli-{os.getpid()}", model=args.model,
                       resolution=args.resolution, batch_size=args.batch_size, max_steps=args.steps,
                       lora=args.method == "lora", checkpoint_every=0, quiet=True, seed=0, device=args.device,
                       buckets=buckets, adapter=adapter),
        callback=on_step,
    )
    return {**rates(stamps, args.batch_size), "peak_mb": peak_memory_mb(),
            "cache_s": result.cache_seconds, "total_s": time.perf_counter() - t0, "final_loss": result.losses[-1],
            "vae_images_cache": before_training[0], "vae_images_training": encoded["images"] - before_training[0]}


def run_reference(args) -> dict:
    """The usual loop: VAE encode and text encode inside every step."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig

    from sdcli.training.data import discover, load_rgb, to_pixels

    from accelerate import Accelerator

    t0 = time.perf_counter()
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    # As diffusers' train_text_to_image_lora.py runs with --mixed_precision fp16 (sdcli's default on CUDA): the
    # frozen models in float16, the LoRA weights in float32, the forward under autocast, a scaled backward.
    accelerator = Accelerator(mixed_precision="fp16" if device.type == "cuda" else "no", cpu=device.type == "cpu")
    weight_dtype = torch.float16 if accelerator.mixed_precision == "fp16" else torch.float32
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None)
    vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    if args.method == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    for model in (vae, text_encoder) + ((unet,) if args.method == "lora" else ()):
        model.to(device, dtype=weight_dtype)
    unet.to(device)
    if args.method == "lora":
        from diffusers.training_utils import cast_training_params

        cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    examples = discover(Path(args.data)).examples
    resolution = args.resolution or unet.config.sample_size * pipe.vae_scale_factor
    # Decoded once, so this loop pays for the encoders and nothing else.
    pixels = torch.stack([to_pixels(load_rgb(e.path), resolution)[0] for e in examples])
    captions = [e.caption for e in examples]
    stamps: list[tuple[float, float]] = []
    g = torch.Generator().manual_seed(0)
    unet.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(examples), (args.batch_size,), generator=g)
        prompts = ["" if torch.rand(1, generator=g).item() < 0.1 else captions[i] for i in idx.tolist()]
        with torch.no_grad():
            latents = vae.encode(pixels[idx].to(device, weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            hidden = text_encoder(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), device=device)
        pred = unet(scheduler.add_noise(latents, noise, t), t, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the same per-step sync sdcli makes to log the loss
        stamps.append(stamp())
    return {**rates(stamps, args.batch_size), "peak_mb": peak_memory_mb(), "cache_s": 0.0,
            "total_s": time.perf_counter() - t0, "final_loss": loss.item()}


LAUNCH_CONFIGS = {
    # MULTI_GPU is accelerate's DDP launcher, which starts gloo processes on a CPU; a MULTI_CPU config starts one.
    "ddp": "distributed_type: MULTI_GPU\n",
    "fsdp": "distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
            "  fsdp_reshard_after_forward: true\n",
    "deepspeed": "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n",
}
SHARDED = {"fsdp": "FSDP2", "deepspeed": "DeepSpeed ZeRO-2"}


def run_launched(args, which: str, work: Path, run: int) -> dict:
    """`accelerate launch` on 2 processes with ``which``'s config; images/s from the run's loss.csv."""
    config = work / f"{which}.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\nnum_processes: 2\nnum_machines: 1\nmachine_rank: 0\n"
                      "mixed_precision: 'no'\n"
                      + LAUNCH_CONFIGS[which])
    out = work / f"{which}-{run}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "sdcli",
           "finetune", "--data", args.data, "--model", args.model, "--out", str(out), "--quiet",
           "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--checkpoint-every", "0",
           "--seed", "0", "--device", args.device, *(["--full"] if args.method == "full" else []),
           *(["--resolution", str(args.resolution)] if args.resolution else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    # Through a fresh wrapper process, whose children's peak RSS is this run's alone (the largest worker's).
    wrapper = ("import json, resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
               "print(json.dumps([p.returncode, u.ru_maxrss, u.ru_utime + u.ru_stime]))")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    code, maxrss_kb, cpu = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else (1, 0, 0)
    if code or proc.returncode:
        sys.exit(f"{which} run failed:\n{proc.stderr[-3000:]}")
    rows = [line.split(",") for line in (out / "loss.csv").read_text().splitlines()[1:]]
    elapsed = [float(r[5]) for r in rows]
    images = args.batch_size * 2 * (len(elapsed) - 2)
    return {"images_per_s": images / (elapsed[-1] - elapsed[1]), "final_loss": float(rows[-1][2]),
            "peak_mb": maxrss_kb / 1024, "cpu_s_per_image": cpu / (args.batch_size * 2 * len(elapsed))}


def sharded_summary(args, results: dict[str, list[dict]], med, sharded: str) -> None:
    summary = {"method": args.method, "batch_size_per_process": args.batch_size, "processes": 2, "steps": args.steps,
               "runs": args.runs, **{f"{w}_{k}": med(w, k) for w in (sharded, "ddp")
                                     for k in ("images_per_s", "peak_mb", "final_loss")}, "runs_detail": results}
    summary["speed_ratio"] = summary[f"{sharded}_images_per_s"] / summary["ddp_images_per_s"]
    print(f"{'':9s} {'images/s':>9s} {'peak MB':>8s} {'final loss':>10s}")
    for which in (sharded, "ddp"):
        print(f"{which:9s} {summary[which + '_images_per_s']:9.2f} {summary[which + '_peak_mb']:8.0f} "
              f"{summary[which + '_final_loss']:10.5f}")
    print(f"{SHARDED[sharded]} runs at {summary['speed_ratio']:.2f}x plain data parallel's images/s "
          f"(2 processes, {args.method}, batch {args.batch_size} each)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.child == "reference":
        record = run_reference(args)
    elif args.child in ADAPTERS:
        record = run_sdcli(args, adapter=args.child)
    else:
        record = run_sdcli(args, buckets=args.child != "square")
    print("RESULT " + json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Pipeline folder (default: a small random SD-1-shaped one).")
    parser.add_argument("--data", help="Captioned image folder (default: generated).")
    parser.add_argument("--images", type=int, default=24, help="Images to generate when --data is not given.")
    parser.add_argument("--resolution", type=int, default=None, help="Training size (default: the model's).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (CPU).")
    parser.add_argument("--json", help="Also write the results here.")
    parser.add_argument("--mixed-aspect", action="store_true",
                        help="Compare aspect-ratio buckets with square crops on mixed-aspect images instead.")
    parser.add_argument("--adapters", action="store_true",
                        help="Compare --adapter dora, loha and lokr with lora instead.")
    parser.add_argument("--fsdp", action="store_true",
                        help="Compare FSDP2 with plain data parallel, 2 processes under accelerate launch, instead.")
    parser.add_argument("--deepspeed", action="store_true",
                        help="Compare DeepSpeed ZeRO-2 with plain data parallel, as --fsdp does, instead.")
    parser.add_argument("--child", choices=["sdcli", "reference", "buckets", "square", *ADAPTERS],
                        help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model or small_pipeline(work)
        make = make_mixed_data if args.mixed_aspect else make_data
        data = args.data or make(work / "data", args.images, args.resolution or 128)
        pair = (("buckets", "square") if args.mixed_aspect else ADAPTERS if args.adapters
                else ("fsdp", "ddp") if args.fsdp else ("deepspeed", "ddp") if args.deepspeed
                else ("sdcli", "reference"))
        results: dict[str, list[dict]] = {which: [] for which in pair}
        for run in range(args.runs):
            for which in pair[::-1] if run % 2 else pair:  # interleaved
                if args.fsdp or args.deepspeed:
                    args.model, args.data = model, data
                    results[which].append(run_launched(args, which, work, run))
                    last = results[which][-1]
                    print(f"run {run + 1} {which:9s} {last['images_per_s']:7.2f} img/s  peak {last['peak_mb']:6.0f} MB",
                          file=sys.stderr)
                    continue
                cmd = [sys.executable, __file__, "--child", which, "--model", model, "--data", data, "--work", tmp,
                       "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--method", args.method,
                       "--device", args.device, "--threads", str(args.threads)]
                if args.resolution:
                    cmd += ["--resolution", str(args.resolution)]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    sys.exit(f"{which} run failed:\n{proc.stderr[-3000:]}")
                results[which].append(json.loads(line[0][7:]))
                last = results[which][-1]
                print(f"run {run + 1} {which:9s} {last['images_per_s']:7.2f} img/s  "
                      f"{last['cpu_s_per_image'] * 1000:6.1f} cpu-ms/img  peak {last['peak_mb']:6.0f} MB", file=sys.stderr)

    def med(which, key):
        return statistics.median(r[key] for r in results[which])

    if args.mixed_aspect:
        mixed_summary(args, results, med)
        return
    if args.fsdp or args.deepspeed:
        sharded_summary(args, results, med, "fsdp" if args.fsdp else "deepspeed")
        return
    if args.adapters:
        # CPU time per image is the steadier figure on a shared machine; both are LoRA's speed over this one's.
        summary = {name: {"images_per_s": med(name, "images_per_s"),
                          "ratio_to_lora": med(name, "images_per_s") / med("lora", "images_per_s"),
                          "cpu_ratio_to_lora": med("lora", "cpu_s_per_image") / med(name, "cpu_s_per_image")}
                   for name in ADAPTERS}
        for name, row in summary.items():
            print(f"{name:6s} {row['images_per_s']:8.2f} img/s  {row['ratio_to_lora']:.2f}x LoRA by wall clock, "
                  f"{row['cpu_ratio_to_lora']:.2f}x by CPU time")
        if args.json:
            Path(args.json).write_text(json.dumps({"batch_size": args.batch_size, "steps": args.steps,
                                                   "runs": args.runs, **summary, "runs_detail": results}, indent=2))
        return

    summary = {
        "method": args.method, "batch_size": args.batch_size, "steps": args.steps, "runs": args.runs,
        "resolution": args.resolution or "native", "images": args.images if not args.data else "given",
        "sdcli_images_per_s": med("sdcli", "images_per_s"), "reference_images_per_s": med("reference", "images_per_s"),
        "sdcli_peak_mb": med("sdcli", "peak_mb"), "reference_peak_mb": med("reference", "peak_mb"),
        "sdcli_cpu_s_per_image": med("sdcli", "cpu_s_per_image"),
        "reference_cpu_s_per_image": med("reference", "cpu_s_per_image"),
        "sdcli_cache_s": med("sdcli", "cache_s"), "runs_detail": results,
    }
    summary["speedup"] = summary["sdcli_images_per_s"] / summary["reference_images_per_s"]
    summary["cpu_speedup"] = summary["reference_cpu_s_per_image"] / summary["sdcli_cpu_s_per_image"]
    summary["memory_ratio"] = summary["sdcli_peak_mb"] / summary["reference_peak_mb"]
    print(f"{'':10s} {'images/s':>9s} {'cpu-ms/img':>10s} {'peak MB':>8s}")
    for which in ("sdcli", "reference"):
        print(f"{which:10s} {summary[which + '_images_per_s']:9.2f} {summary[which + '_cpu_s_per_image'] * 1000:10.1f} "
              f"{summary[which + '_peak_mb']:8.0f}")
    print(f"sdcli built its cache once in {summary['sdcli_cache_s']:.1f} s")
    print(f"speed-up {summary['speedup']:.2f}x by wall clock, {summary['cpu_speedup']:.2f}x by CPU time (target >= 1.5x); "
          f"memory {summary['memory_ratio']:.2f}x (target <= 1)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


def mixed_summary(args, results: dict[str, list[dict]], med) -> None:
    summary = {
        "method": args.method, "batch_size": args.batch_size, "steps": args.steps, "runs": args.runs,
        "resolution": args.resolution or "native", "images": args.images if not args.data else "given",
        **{f"{which}_{key}": med(which, key) for which in ("buckets", "square")
           for key in ("images_per_s", "cpu_s_per_image", "peak_mb", "cache_s")},
        "vae_images_cache": [r["vae_images_cache"] for r in results["buckets"]],
        "vae_images_training": [r["vae_images_training"] for r in results["buckets"]],
        "runs_detail": results,
    }
    summary["cost"] = 1 - summary["buckets_images_per_s"] / summary["square_images_per_s"]
    summary["cpu_cost"] = summary["buckets_cpu_s_per_image"] / summary["square_cpu_s_per_image"] - 1
    # Each run's two halves ran back to back, so their ratio shrugs off the machine getting busier between runs.
    paired = [b["images_per_s"] / s["images_per_s"] for b, s in zip(results["buckets"], results["square"])]
    summary["paired_cost"] = 1 - statistics.median(paired)
    print(f"{'':10s} {'images/s':>9s} {'cpu-ms/img':>10s} {'peak MB':>8s} {'cache s':>8s}")
    for which in ("buckets", "square"):
        print(f"{which:10s} {summary[which + '_images_per_s']:9.2f} {summary[which + '_cpu_s_per_image'] * 1000:10.1f} "
              f"{summary[which + '_peak_mb']:8.0f} {summary[which + '_cache_s']:8.2f}")
    print(f"buckets cost {summary['cost'] * 100:+.1f}% images/s by wall clock (median of each run's own ratio: "
          f"{summary['paired_cost'] * 100:+.1f}%), {summary['cpu_cost'] * 100:+.1f}% CPU time per image "
          "(target: under 5%)")
    print(f"VAE images encoded per buckets run: {summary['vae_images_cache']} building the cache, "
          f"{summary['vae_images_training']} during training")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

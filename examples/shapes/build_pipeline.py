"""Assemble the shapes pipeline before training: trained VAE and tokenizer, random UNet and text encoder.

The result is an ordinary diffusers StableDiffusionPipeline folder that
`sdcli finetune --full` trains and `sdcli generate` runs. Its sizes were chosen
for this machine (2 shared CPU cores): 3.83 M parameters in all (15.4 MB of
safetensors, under the 20 MB budget), and 25 steps with guidance (the UNet sees
a batch of 2) denoise one 64x64 image in about 0.33 s on one thread.

    python examples/shapes/build_pipeline.py --vae build/shapes/vae --tokenizer build/shapes/tokenizer --out build/shapes/init

The scheduler is v-prediction on a zero-terminal-SNR schedule (see README.md, "Why this schedule").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

SIZE_LIMIT_MB = 20.0

# Latents are 4x16x16; three levels (16, 8, 4) with cross-attention on the two coarse ones, where each
# latent pixel sees a quarter of the image or more: enough to place a shape and give it a colour.
UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 96],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 4,  # diffusers' historical name: this is the number of heads (16 and 24 wide)
    "cross_attention_dim": 128,
    "norm_num_groups": 16,
}
TEXT_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "hidden_act": "quick_gelu",
    "projection_dim": 128,
}
# Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed": Stable Diffusion's betas
# rescaled to zero terminal SNR, v-prediction (epsilon cannot be learned where SNR is zero), and trailing
# timesteps so sampling starts at the pure-noise step the model was trained on.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "clip_sample": False,
    "set_alpha_to_one": True,  # the last step lands on the clean image
    "steps_offset": 1,  # unused by trailing spacing; 1 keeps the pipeline from rewriting the config with a warning
}


def build_pipeline(vae_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0, token_std: float | None = None):
    """A StableDiffusionPipeline with the trained VAE and tokenizer and a random UNet and text encoder.

    ``token_std`` redraws the text encoder's word embeddings at that standard deviation (None: CLIP's own init,
    0.02, what built the shipped model). Each attention and MLP branch of the random encoder adds about 0.5 of
    context to them, so at CLIP's init the state at a word is mostly its context; at 0.6 the word outweighs it
    (README.md, "Partial captions: the second attempt").
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # 1. The parts that were trained or written already.
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    vae = AutoencoderKL.from_pretrained(str(vae_dir))
    latent_side = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    if latent_side != UNET_CONFIG["sample_size"] or vae.config.latent_channels != UNET_CONFIG["in_channels"]:
        raise ValueError(
            f"the VAE at {vae_dir} makes {vae.config.latent_channels}x{latent_side}x{latent_side} latents; "
            f"the UNet expects {UNET_CONFIG['in_channels']}x{UNET_CONFIG['sample_size']}x{UNET_CONFIG['sample_size']}"
        )

    # 2. Random text encoder sized to the tokenizer: the pooled output looks for the real end token.
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT_CONFIG,
        )
    )
    if token_std is not None:
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight.normal_(0.0, token_std)

    # 3. Random UNet whose cross-attention reads the text encoder's hidden states.
    unet = UNet2DConditionModel(**{**UNET_CONFIG, "cross_attention_dim": TEXT_CONFIG["hidden_size"]})

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def safetensors_mb(folder: str | Path) -> float:
    """Total size of a folder's .safetensors files, in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors")) / 1e6


def parameter_counts(pipe) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "text_encoder", "vae")}


def time_denoising(pipe, steps: int = 25, guidance: float = 7.5, runs: int = 5, threads: int | None = None) -> dict:
    """Median seconds to denoise one image (latents out, no VAE decode) and to make the decoded image."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a large red circle in the top left corner on a black background"
    size = pipe.vae.config.sample_size

    def once(output_type: str) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                 output_type=output_type, generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - start

    once("latent")  # warm-up: first calls pay for allocation and kernel selection
    denoise = [once("latent") for _ in range(runs)]
    full = [once("pil") for _ in range(max(1, runs // 2))]
    return {
        "threads": torch.get_num_threads(),
        "steps": steps,
        "denoise_seconds_median": statistics.median(denoise),
        "denoise_seconds_all": [round(t, 3) for t in denoise],
        "image_seconds_median": statistics.median(full),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", required=True, help="trained AutoencoderKL folder (train_vae.py --out)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (tokenizer.py --out)")
    parser.add_argument("--out", required=True, help="folder for the pipeline (diffusers layout, safetensors)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random UNet and text encoder")
    parser.add_argument("--token-std", type=float, default=None,
                        help="redraw the text encoder's word embeddings at this std (default: CLIP's init, 0.02)")
    parser.add_argument("--time", action="store_true", help="also time 25-step denoising (median of 5 runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for --time (default: torch's)")
    args = parser.parse_args(argv)
    pipe = build_pipeline(args.vae, args.tokenizer, args.seed, args.token_std)
    pipe.save_pretrained(args.out, safe_serialization=True)
    report = {"out": args.out, "safetensors_mb": round(safetensors_mb(args.out), 2), "parameters": parameter_counts(pipe)}
    if report["safetensors_mb"] > SIZE_LIMIT_MB:
        print(f"warning: {report['safetensors_mb']} MB is over the {SIZE_LIMIT_MB:g} MB budget", file=sys.stderr)
    if args.time:
        report["timing"] = time_denoising(pipe, threads=args.threads)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

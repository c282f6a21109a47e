"""Tiny random-weight pipelines for tests, examples and benchmarks.

Nothing here touches the network: the tokenizer is written from scratch (a
word-level CLIP BPE vocabulary plus every byte, so any text tokenizes), and
every model is built from a config under a fixed seed, the way diffusers' own
tests build theirs. Each family is what `sdcli.pipeline` must recognise:
SD 1.x (epsilon), SD 2.x (v-prediction, 1024-d style config) and SDXL
(two text encoders, micro-conditioning).
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("sd1", "sd2", "sdxl")
# SD 1.x with a 9-channel UNet (noisy latents + mask + masked image's latents), as inpainting models have.
# Not in FAMILIES: only the inpainting tests need it.
INPAINT = "sd1-inpaint"

# Words the tiny tokenizer knows whole; everything else falls back to bytes.
_WORDS = (
    "a an the of in on at with and large small red green blue yellow orange purple "
    "white black gray circle square triangle star cat dog photo painting top bottom "
    "left right center corner background"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # The byte-to-printable mapping GPT-2 and CLIP use for byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair, every occurrence, until none applies."""
    while len(pieces) > 1:
        pairs = [(ranks[p], p) for p in zip(pieces, pieces[1:]) if p in ranks]
        if not pairs:
            break
        first, second = min(pairs)[1]
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == (first, second):
                merged.append(first + second)
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def write_clip_tokenizer(folder: str | Path, words: tuple[str, ...] | list[str] = _WORDS, max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for a CLIPTokenizer.

    Each word in ``words`` becomes a single token; other text still tokenizes,
    byte by byte. BPE applies merges by rank across a word, so each word is
    first split with the merges so far and new merges (ranked last) join what
    remains: earlier words keep their single token, since every merge they use
    still outranks the new ones.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in byte_chars:
        vocab.setdefault(ch, len(vocab))
    for ch in byte_chars:
        vocab.setdefault(ch + "</w>", len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(pieces := _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ranks))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _tokenizer(tmp: Path, max_length: int):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp, max_length=max_length)))


def _text_encoder(vocab_size: int, hidden: int = 32, projection: bool = False, max_length: int = 77):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=max_length,
        projection_dim=hidden,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def build_tiny_pipeline(family: str = "sd1", seed: int = 0, max_length: int = 77):
    """Return a tiny random-weight diffusers pipeline of ``family`` (sd1, sd2, sdxl, or sd1-inpaint).

    The VAE halves the resolution once (factor 2), so 16x16 images cost a
    4-channel 8x8 latent: fast enough to run dozens of times in a test suite.
    """
    import tempfile

    from sdcli.progress import quiet_libraries

    quiet_libraries()  # before diffusers/transformers import, so their warnings stay quiet
    import torch
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    if family not in FAMILIES + (INPAINT,):
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES + (INPAINT,))}")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp) / "tok", max_length)
        vocab_size = len(tokenizer)
        if family == "sdxl":
            tokenizer_2 = _tokenizer(Path(tmp) / "tok2", max_length)
    # Two UNet levels, 8x8 latents: the smallest UNet that still has cross-attention.
    unet_common = dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=9 if family == INPAINT else 4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    if family in ("sd1", "sd2", INPAINT):
        unet = UNet2DConditionModel(
            **unet_common,
            cross_attention_dim=32,
            attention_head_dim=(2, 4) if family == "sd2" else 8,
            use_linear_projection=family == "sd2",
        )
        vae = _vae()
        text_encoder = _text_encoder(vocab_size, max_length=max_length)
        if family in ("sd1", INPAINT):
            scheduler = PNDMScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                steps_offset=1, set_alpha_to_one=False,
            )
        else:
            scheduler = DDIMScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1,
            )
        cls = StableDiffusionInpaintPipeline if family == INPAINT else StableDiffusionPipeline
        return cls(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    unet = UNet2DConditionModel(
        **unet_common,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text (32) + six micro-conditioning ids
        cross_attention_dim=64,  # both text encoders' hidden states side by side
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(vocab_size, max_length=max_length),
        text_encoder_2=_text_encoder(vocab_size, projection=True, max_length=max_length),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def save_tiny_pipeline(path: str | Path, family: str = "sd1", seed: int = 0) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder (safetensors)."""
    path = Path(path)
    build = build_tiny_flow_pipeline if family in FLOW_FAMILIES else build_tiny_pipeline
    build(family, seed=seed).save_pretrained(str(path), safe_serialization=True)
    return path


def save_random_lora(model_path: str | Path, out: str | Path, rank: int = 4, seed: int = 0) -> Path:
    """Write a LoRA with random (non-zero) weights for the UNet of the pipeline at ``model_path``,
    in the diffusers format `load_lora_weights` reads."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(str(model_path))
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op LoRA); make it do something
                param.normal_(0, 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(str(out), unet_lora_layers=layers, safe_serialization=True)
    return Path(out)


# ---------------------------------------------------------------------------------------------------------
# Flow-matching transformers: Stable Diffusion 3 and Flux, as small as their pipelines allow.

FLOW_FAMILIES = ("sd3", "flux", "flux-schnell")  # flux: guidance-distilled (dev-like); schnell: no guidance input


def write_t5_tokenizer(folder: str | Path, words: tuple[str, ...] | list[str] = _WORDS, max_length: int = 77):
    """A T5-style tokenizer (SentencePiece Unigram, "▁" word marks, </s> at the end) built with the
    `tokenizers` library: each word of ``words`` is one piece, anything else falls back to letters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'()[]-_/"]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(words)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=max_length)
    fast.save_pretrained(str(folder))
    return T5TokenizerFast.from_pretrained(str(folder))


def _t5_encoder(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1))


def _flow_vae(shift: float, scale: float):
    from diffusers import AutoencoderKL

    # As SD3's and Flux's VAEs: no quant convs, a shift as well as a scale on the latents.
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=4, norm_num_groups=8, sample_size=16, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=shift, scaling_factor=scale)


def build_tiny_flow_pipeline(family: str = "sd3", seed: int = 0):
    """A tiny random-weight Stable Diffusion 3 or Flux pipeline (two CLIPs and a T5 for SD3; a CLIP and a T5 for Flux).

    16x16 images: the VAE halves them to an 8x8 latent, which SD3 patches 1x1 and Flux packs 2x2.
    """
    import tempfile

    from sdcli.progress import quiet_libraries

    quiet_libraries()
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    if family not in FLOW_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FLOW_FAMILIES)}")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp) / "tok", 77)
        tokenizer_2 = _tokenizer(Path(tmp) / "tok2", 77)
        t5_tokenizer = write_t5_tokenizer(Path(tmp) / "t5")
    if family == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
            pos_embed_max_size=16,
        )
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(0.0609, 1.5035),
            text_encoder=_text_encoder(len(tokenizer), projection=True), tokenizer=tokenizer,
            text_encoder_2=_text_encoder(len(tokenizer_2), projection=True), tokenizer_2=tokenizer_2,
            text_encoder_3=_t5_encoder(len(t5_tokenizer)), tokenizer_3=t5_tokenizer,
        )
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=family == "flux",
    )
    # Flux's resolution-dependent shift: mu from the image's token count.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_flow_vae(0.1159, 0.3611),
        text_encoder=_text_encoder(len(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(len(t5_tokenizer)), tokenizer_2=t5_tokenizer,
    )


# ---------------------------------------------------------------------------------------------------------
# ControlNets for the tiny UNet families.


def build_tiny_controlnet(family: str = "sd1", seed: int = 0):
    """A ControlNet for the tiny ``family`` pipeline's UNet (sd1, sd2 or sdxl), with random non-zero weights.

    Made as ControlNets are trained from a UNet (`ControlNetModel.from_unet`), with a conditioning
    embedding that halves the control image once, as the tiny VAE does. Training starts its output
    convolutions at zero, which would leave the image untouched; here they are drawn at random under
    ``seed`` so the control image changes the result. The family's own pipeline weights are not touched.
    """
    from sdcli.progress import quiet_libraries

    quiet_libraries()
    import torch
    from diffusers import ControlNetModel

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    unet = build_tiny_pipeline(family).unet
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    generator = torch.Generator().manual_seed(seed)
    zero_initialised = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(zero_initialised):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return controlnet


def save_tiny_controlnet(path: str | Path, family: str = "sd1", seed: int = 0) -> Path:
    """Build a tiny ControlNet (`build_tiny_controlnet`) and save it as a diffusers folder (safetensors)."""
    path = Path(path)
    build_tiny_controlnet(family, seed=seed).save_pretrained(str(path), safe_serialization=True)
    return path


# ---------------------------------------------------------------------------------------------------------
# Pipelines of classes no sdcli family file claims, for the generic family: PixArt-α (T5, a DiT, a VAE) and Sana
# (Gemma 2, a linear-attention DiT, a deep-compression VAE, DPM-Solver on flow σ's).

GENERIC_CLASS = "PixArtAlphaPipeline"
GENERIC_KINDS = {"pixart": "PixArtAlphaPipeline", "sana": "SanaPipeline"}


def build_tiny_generic_pipeline(seed: int = 0, kind: str = "pixart"):
    """A tiny random-weight pipeline of a class the generic family drives (`GENERIC_KINDS`).

    pixart: PixArt-α with a 2-layer T5, a one-block PixArt transformer, a 4-level VAE. PixArt snaps its size to
    aspect-ratio bins chosen by the transformer's sample_size (32: the 256-pixel bins), so its 256x256 default is
    also the smallest square it renders; the VAE's factor 8 keeps that a 32x32 latent, 16x16 patches.

    sana: Sana with a one-layer Gemma 2, a one-block Sana transformer and a 6-level deep-compression VAE (factor
    32, as the real one), sampled as the real Sana is: DPM-Solver++ on flow-matching σ's. Its sample_size 16
    picks the 512-pixel bins (Sana 512's), so every image is made at 512x512 or its aspect's bin (16x16 latents)
    and resized to the size asked.
    """
    if kind not in GENERIC_KINDS:
        raise ValueError(f"kind must be one of {sorted(GENERIC_KINDS)}, not {kind!r}")
    import tempfile

    from sdcli.progress import quiet_libraries

    quiet_libraries()
    import torch

    torch.manual_seed(seed)
    if kind == "sana":
        return _tiny_sana()
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_t5_tokenizer(Path(tmp) / "t5")
    transformer = PixArtTransformer2DModel(
        sample_size=32, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, out_channels=8, cross_attention_dim=16, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=4, sample_size=32, layers_per_block=1)
    # PixArt-α's own sampler: DPM-Solver++ over a linear β schedule.
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=_t5_encoder(len(tokenizer)), vae=vae,
                               transformer=transformer, scheduler=scheduler)


def gemma_tokenizer():
    """A Gemma tokenizer as transformers builds one (BPE with byte fallback, "▁" for spaces, <bos> first): one
    token a lowercase letter, bytes for anything else, so any text tokenizes. No files: Gemma's class takes its
    vocabulary directly."""
    from transformers import GemmaTokenizer

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *(f"<0x{b:02X}>" for b in range(256)), "▁",
              *"abcdefghijklmnopqrstuvwxyz"]
    return GemmaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], add_bos_token=True)


def _tiny_sana():
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = gemma_tokenizer()
    text_encoder = Gemma2Model(Gemma2Config(
        hidden_size=8, head_dim=4, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2,
        num_hidden_layers=1, vocab_size=len(tokenizer), max_position_embeddings=2048, pad_token_id=0, eos_token_id=1,
        bos_token_id=2))
    transformer = SanaTransformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
        attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8,
        caption_channels=8)
    # Six levels halve the side five times (factor 32); attention only at the deepest, as the real DC-AE's.
    levels = 6
    blocks = ("ResBlock",) * (levels - 1) + ("EfficientViTBlock",)
    scales = ((),) * (levels - 1) + ((5,),)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=blocks,
        decoder_block_types=blocks, encoder_block_out_channels=(8,) * levels, decoder_block_out_channels=(8,) * levels,
        encoder_qkv_multiscales=scales, decoder_qkv_multiscales=scales, encoder_layers_per_block=(1,) * levels,
        decoder_layers_per_block=(1,) * levels, downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)


def save_tiny_generic_pipeline(path: str | Path, seed: int = 0, kind: str = "pixart") -> Path:
    """Save `build_tiny_generic_pipeline` as a diffusers folder; returns its path."""
    path = Path(path)
    build_tiny_generic_pipeline(seed, kind).save_pretrained(str(path), safe_serialization=True)
    return path


# ---------------------------------------------------------------------------------------------------------
# GGUF files of a tiny pipeline's denoiser, as ComfyUI-GGUF users have them for real models.


def save_tiny_gguf(model_path: str | Path, out: str | Path, qtype: str = "Q8_0", denoiser: str = "transformer",
                   architecture: str | None = None, original: str | None = None) -> Path:
    """Write the ``denoiser`` weights of the saved pipeline at ``model_path`` as a GGUF file: every 2-D weight whose
    rows split into ``qtype``'s blocks quantized to it (Q8_0, Q4_0, Q5_1, ... whatever the gguf package can write;
    it writes no K-quants), the rest float32, in diffusers' tensor names (which diffusers loads unconverted), or in
    the ``original`` family's own names (`original_layout`: zimage, flux2), as GGUF files of real models have them."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    kind = gguf.GGMLQuantizationType[qtype]
    block, _size = gguf.GGML_QUANT_SIZES[kind]
    weights = load_file(str(Path(model_path) / denoiser / "diffusion_pytorch_model.safetensors"))
    if original:
        weights = original_layout(weights, original)
    writer = gguf.GGUFWriter(str(out), arch=architecture or "unknown")
    for name, tensor in weights.items():
        array = tensor.float().numpy()
        # Weights only, as real GGUF converters do: a 2-D parameter used as it is (Z-Image's pad tokens) stays float.
        if array.ndim == 2 and array.shape[-1] % block == 0 and name.endswith(".weight"):
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out)


# Denoiser-only files as people download them (ComfyUI's diffusion_models/ folder): the original code's tensor names,
# ComfyUI's prefix, float8 weights (plain, or scaled as ComfyUI's "fp8mixed"/"scaled" files store them). The names
# are written here from diffusers' converters read backwards (diffusers/loaders/single_file_utils.py), so a test of
# sdcli against diffusers' from_single_file also checks that reading.

ORIGINAL_LAYOUTS = ("zimage", "flux2")  # families whose original names differ and diffusers converts any size of
COMFY_PREFIX = "model.diffusion_model."


def _swap_halves(tensor):
    """The original code's (shift, scale) as diffusers' (scale, shift), and back: the same swap."""
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


_ZIMAGE_NAMES = (("all_final_layer.2-1.", "final_layer."), ("all_x_embedder.2-1.", "x_embedder."),
                 (".attention.to_out.0.", ".attention.out."), (".attention.norm_k.", ".attention.k_norm."),
                 (".attention.norm_q.", ".attention.q_norm."))


def _zimage_original(state: dict) -> dict:
    out, qkv = {}, {}
    for key, value in state.items():
        for part in ("to_q", "to_k", "to_v"):
            if f".attention.{part}.weight" in key:
                qkv.setdefault(key.replace(f".attention.{part}.weight", ".attention.qkv.weight"), {})[part] = value
                break
        else:
            for ours, theirs in _ZIMAGE_NAMES:
                key = key.replace(ours, theirs)
            out[key] = value
    import torch

    for key, parts in qkv.items():
        out[key] = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]], dim=0)
    dim = out["x_embedder.weight"].shape[0]
    out["norm_final.weight"] = torch.ones(dim)  # in the original model, unused: diffusers drops it
    return out


_FLUX2_TOP = {"x_embedder.": "img_in.", "context_embedder.": "txt_in.",
              "time_guidance_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
              "time_guidance_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
              "time_guidance_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
              "time_guidance_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
              "double_stream_modulation_img.linear.": "double_stream_modulation_img.lin.",
              "double_stream_modulation_txt.linear.": "double_stream_modulation_txt.lin.",
              "single_stream_modulation.linear.": "single_stream_modulation.lin.", "proj_out.": "final_layer.linear."}
_FLUX2_DOUBLE = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
                 "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                 "attn.to_out.0.weight": "img_attn.proj.weight", "ff.linear_in.weight": "img_mlp.0.weight",
                 "ff.linear_out.weight": "img_mlp.2.weight",
                 "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                 "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
                 "attn.to_add_out.weight": "txt_attn.proj.weight",
                 "ff_context.linear_in.weight": "txt_mlp.0.weight", "ff_context.linear_out.weight": "txt_mlp.2.weight"}
_FLUX2_SINGLE = {"attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
                 "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}


_FLUX2_QKV = {"img": ("to_q", "to_k", "to_v"), "txt": ("add_q_proj", "add_k_proj", "add_v_proj")}


def _flux2_original(state: dict) -> dict:
    import torch

    out, qkv = {}, {}
    for key, value in state.items():
        if key == "norm_out.linear.weight":
            out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(value)
        elif key.startswith("transformer_blocks."):
            _, index, rest = key.split(".", 2)
            part = rest.split(".")[1]
            stream = next((s for s, names in _FLUX2_QKV.items() if part in names), None)
            if stream and rest.startswith("attn."):
                qkv.setdefault((index, stream), {})[part] = value
            else:
                out[f"double_blocks.{index}.{_FLUX2_DOUBLE[rest]}"] = value
        elif key.startswith("single_transformer_blocks."):
            _, index, rest = key.split(".", 2)
            out[f"single_blocks.{index}.{_FLUX2_SINGLE[rest]}"] = value
        else:
            prefix = next(p for p in _FLUX2_TOP if key.startswith(p))
            out[_FLUX2_TOP[prefix] + key[len(prefix):]] = value
    for (index, stream), parts in qkv.items():  # fused in the original: q, k and v stacked
        out[f"double_blocks.{index}.{stream}_attn.qkv.weight"] = torch.cat([parts[n] for n in _FLUX2_QKV[stream]])
    return out


def original_layout(state: dict, family: str) -> dict:
    """A diffusers transformer's tensors under the names of ``family``'s original code (`ORIGINAL_LAYOUTS`)."""
    return {"zimage": _zimage_original, "flux2": _flux2_original}[family](dict(state))


def save_denoiser_file(model_path: str | Path, out: str | Path, original: str | None = None, prefix: str = "",
                       float8: str | None = None, denoiser: str = "transformer") -> Path:
    """Write the ``denoiser`` of the saved pipeline at ``model_path`` as one safetensors file, as people download
    them: in ``original``'s own names (`ORIGINAL_LAYOUTS`; None: diffusers' names), each name after ``prefix``
    (`COMFY_PREFIX` as ComfyUI saves them), with ``float8`` None (as saved), "plain" (every 2-D weight stored as
    float8_e4m3fn) or "scaled" (ComfyUI's scaled fp8: the weight divided by a per-tensor ``weight_scale`` before
    storing, with the ``input_scale`` and ``comfy_quant`` tensors its own kernels read)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(Path(model_path) / denoiser / "diffusion_pytorch_model.safetensors"))
    if original:
        state = original_layout(state, original)
    if float8:
        for key in [k for k, v in state.items() if v.dim() == 2 and k.endswith(".weight")]:
            weight = state[key].float()
            if float8 == "scaled":
                scale = weight.abs().max().clamp(min=1e-8) / 448  # e4m3's largest value
                state[key[: -len("weight")] + "weight_scale"] = scale.reshape(())
                state[key[: -len("weight")] + "input_scale"] = torch.ones(())
                state[key[: -len("weight")] + "comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'),
                                                                            dtype=torch.uint8)
                weight = weight / scale
            state[key] = weight.to(torch.float8_e4m3fn)
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(out))
    return Path(out)


# Chroma, Z-Image and Qwen-Image (and Qwen-Image-Edit / Edit-Plus), as small as their pipelines allow, with their
# text encoders (T5; Qwen3; Qwen2.5-VL) and a Qwen2 tokenizer built here. 32x32 images: 16 latent tokens.

NEW_FLOW_FAMILIES = ("chroma", "zimage", "zimage-turbo", "qwenimage", "qwenimage-edit", "qwenimage-edit-plus")
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# ChatML, as Qwen's own template writes a conversation (Z-Image formats its prompts with it).
_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_qwen_tokenizer(folder: str | Path):
    """A Qwen2 tokenizer: byte-level BPE over the 256 bytes alone (no merges: every text tokenizes, a byte a
    token), Qwen's special tokens and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(_bytes_to_unicode().values()))}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    qwen = Qwen2Tokenizer(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>")
    qwen.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIALS[1:])})
    qwen.chat_template = _CHATML
    qwen.save_pretrained(str(folder))
    return Qwen2Tokenizer.from_pretrained(str(folder))


def _qwen_vl_encoder(tokenizer):
    """A 2-layer Qwen2.5-VL (text and vision towers 16 wide) whose special token ids are the tokenizer's."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(zip(_QWEN_SPECIALS, tokenizer.convert_tokens_to_ids(list(_QWEN_SPECIALS))))
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rope_theta": 1000000.0,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tokenizer), image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _qwen_processor(tokenizer):
    """Qwen2-VL's processor over the tiny tokenizer, images in 28-pixel cells, at most 64 of them (the editing
    pipelines show the text encoder their 1024-pixel input at this size). Made without Qwen2-VL's video
    processor, which needs torchvision and which an image editor never calls, as sdcli loads an editing model
    where torchvision does not import (`sdcli.families.qwenimage.parts`); the same with or without it."""
    from transformers import Qwen2VLImageProcessorPil

    from sdcli.families.qwenimage import images_only_processor

    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=64 * 28 * 28)
    return images_only_processor(images, tokenizer, _CHATML)


def build_tiny_new_flow_pipeline(family: str = "chroma", seed: int = 0):
    """A tiny random-weight Chroma, Z-Image (base or Turbo) or Qwen-Image (or -Edit, -Edit-Plus) pipeline.

    Each is built from configs under ``seed``, as diffusers' own tests build theirs, with a 32-pixel default size.
    Z-Image-Turbo differs from Z-Image only by its scheduler's shift (3 against 6), as the real ones do.
    """
    import tempfile

    from sdcli.progress import quiet_libraries

    quiet_libraries()
    import diffusers
    import torch

    if family not in NEW_FLOW_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(NEW_FLOW_FAMILIES)}")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = (write_t5_tokenizer(Path(tmp) / "t5") if family == "chroma"
                     else write_qwen_tokenizer(Path(tmp) / "qwen"))
    if family == "chroma":
        transformer = diffusers.ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_hidden_dim=32,
            approximator_layers=1, approximator_num_channels=16)
        # Flux's resolution-dependent shift, as Chroma1-HD's scheduler config has it.
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)
        pipe = diffusers.ChromaPipeline(transformer=transformer, scheduler=scheduler, vae=_flow_vae(0.1159, 0.3611),
                                        text_encoder=_t5_encoder(len(tokenizer)).eval(), tokenizer=tokenizer)
        pipe.default_sample_size = 16  # 32 pixels (the class hard-codes 128 latents)
        return pipe
    if family.startswith("zimage"):
        from transformers import Qwen3Config, Qwen3Model

        transformer = diffusers.ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
            axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
        with torch.no_grad():  # allocated with torch.empty: fixed, as diffusers' tests fix them
            transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
            transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
        encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tokenizer),
                                         max_position_embeddings=512)).eval()
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0 if family == "zimage-turbo" else 6.0)
        return diffusers.ZImagePipeline(transformer=transformer, scheduler=scheduler, vae=_flow_vae(0.1159, 0.3611),
                                        text_encoder=encoder, tokenizer=tokenizer)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = diffusers.AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                           temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                           latents_std=[1.5, 0.8, 1.0, 1.2])
    # Qwen-Image's resolution-dependent shift, as its scheduler config has it (exponential time shift).
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    parts = dict(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=_qwen_vl_encoder(tokenizer),
                 tokenizer=tokenizer)
    if family == "qwenimage":
        pipe = diffusers.QwenImagePipeline(**parts)
    else:
        cls = diffusers.QwenImageEditPlusPipeline if family.endswith("plus") else diffusers.QwenImageEditPipeline
        pipe = cls(processor=_qwen_processor(tokenizer), **parts)
    pipe.default_sample_size = 8  # 32 pixels through the VAE's factor 4
    return pipe


def save_tiny_new_flow_pipeline(path: str | Path, family: str = "chroma", seed: int = 0) -> Path:
    """Save `build_tiny_new_flow_pipeline` as a diffusers folder; returns its path."""
    path = Path(path)
    build_tiny_new_flow_pipeline(family, seed).save_pretrained(str(path), safe_serialization=True)
    if family.startswith("qwenimage-edit"):  # name Qwen2-VL's processor, as a real Qwen-Image-Edit folder does
        for name in ("model_index.json", "processor/processor_config.json", "processor/tokenizer_config.json"):
            config = json.loads((path / name).read_text())
            if "processor" in config:
                config["processor"] = ["transformers", "Qwen2VLProcessor"]
            if "processor_class" in config:
                config["processor_class"] = "Qwen2VLProcessor"
            (path / name).write_text(json.dumps(config, indent=2))
    return path


def save_random_transformer_lora(model_path: str | Path, out: str | Path, rank: int = 4, seed: int = 0,
                                 targets: tuple[str, ...] = ("to_q", "to_k", "to_v")) -> Path:
    """Write a LoRA with random (non-zero) weights for the transformer of the pipeline at ``model_path``, in the
    diffusers format its pipeline's `load_lora_weights` reads (peft's key names under ``transformer.``)."""
    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(str(model_path))
    pipe.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op LoRA); make it do something
                param.normal_(0, 0.5)
    type(pipe).save_lora_weights(str(out), transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                 safe_serialization=True)
    return Path(out)



# ---------------------------------------------------------------------------------------------------------
# FLUX.2 (Mistral-type text encoder), FLUX.2 Klein (Qwen3) and FLUX.1 Kontext, for `sdcli.families.flux2`
# and the Kontext side of `sdcli.families.flux`.

FLUX2_KINDS = ("flux2", "klein", "klein-distilled")  # FLUX.2-dev; Klein base (CFG); Klein step-distilled (none)
# The FLUX.2 pipelines read the text encoder's hidden states at these layers (their defaults), so the tiny
# encoders need that many layers: thin ones, so 30 layers stay cheap.
_FLUX2_LAYERS = {"flux2": 30, "klein": 27, "klein-distilled": 27}
_FLUX2_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                        max_image_seq_len=4096, time_shift_type="exponential")  # as FLUX.2-dev's scheduler_config
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}[SYSTEM_PROMPT]{{ m.content[0].text }}"
    "[/SYSTEM_PROMPT]{% else %}[INST]{% for c in m.content %}{% if c.type == 'text' %}{{ c.text }}{% else %}[IMG]"
    "{% endif %}{% endfor %}[/INST]{% endif %}{% endfor %}")
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}")


def _byte_vocab(specials: list[str]) -> dict[str, int]:
    """A byte-level BPE vocabulary: the special tokens, then every byte (so any text tokenizes, byte by byte)."""
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in _bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    return vocab


def write_mistral_tokenizer(folder: str | Path, max_length: int = 512):
    """A byte-level tokenizer with Mistral's special tokens and a chat template of Mistral-Small's shape (system
    prompt, [INST] text [/INST]). FLUX.2's real tokenizer is a PixtralProcessor, which needs torchvision to build;
    the pipeline reads only its chat template and tokenizer, which a tokenizer alone has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<unk>", "[IMG]", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    bpe = Tokenizer(models.BPE(vocab=_byte_vocab(specials), merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=max_length, chat_template=_MISTRAL_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": specials[5:]})
    tok.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def write_qwen3_tokenizer(folder: str | Path, max_length: int = 512):
    """A byte-level Qwen2 tokenizer with Qwen3's chat markers and a chat template that honours enable_thinking."""
    from transformers import AutoTokenizer, Qwen2TokenizerFast

    tok = Qwen2TokenizerFast(vocab=_byte_vocab([]), merges=[], model_max_length=max_length)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = _QWEN_TEMPLATE
    tok.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def _mistral3_encoder(vocab_size: int, layers: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": vocab_size, "hidden_size": 16, "intermediate_size": 24,
                     "max_position_embeddings": 1024, "num_attention_heads": 2, "num_hidden_layers": layers,
                     "num_key_value_heads": 1, "head_dim": 8, "sliding_window": None, "bos_token_id": 2,
                     "eos_token_id": 3, "pad_token_id": 4},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 24, "image_size": 30, "patch_size": 6, "num_channels": 3},
        bos_token_id=2, eos_token_id=3, pad_token_id=4, image_token_index=1, image_seq_length=4,
        vision_feature_layer=-1)
    return Mistral3ForConditionalGeneration(config)


def _qwen3_encoder(vocab_size: int, layers: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=24,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=8, max_position_embeddings=1024))


def build_tiny_flux2_pipeline(kind: str = "flux2", seed: int = 0):
    """A tiny random-weight FLUX.2 pipeline: ``flux2`` (dev: a Mistral3 text encoder, guidance distilled into
    the transformer), ``klein`` (a Qwen3 encoder, classifier-free guidance) or ``klein-distilled`` (step-
    distilled Klein: no guidance). The VAE halves the image and FLUX.2 patches its latent 2x2 into channels, so
    16x16 images are 4x4 tokens; its batch-norm statistics are random, so unnormalising them matters."""
    import tempfile

    from sdcli.progress import quiet_libraries

    quiet_libraries()
    import torch
    from diffusers import (
        AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel,
    )

    if kind not in FLUX2_KINDS:
        raise ValueError(f"unknown FLUX.2 kind {kind!r}; choose from {', '.join(FLUX2_KINDS)}")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "flux2":
            tokenizer = write_mistral_tokenizer(Path(tmp) / "tok")
            text_encoder = _mistral3_encoder(len(tokenizer), _FLUX2_LAYERS[kind])
        else:
            tokenizer = write_qwen3_tokenizer(Path(tmp) / "tok")
            text_encoder = _qwen3_encoder(len(tokenizer), _FLUX2_LAYERS[kind])
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=kind == "flux2")  # three hidden layers of 16 side by side: 48
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), layers_per_block=1, latent_channels=2,
        norm_num_groups=2, sample_size=16, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.5)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(**_FLUX2_SCHEDULER)
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    if kind == "flux2":
        return Flux2Pipeline(**parts)
    return Flux2KleinPipeline(**parts, is_distilled=kind == "klein-distilled")


def save_tiny_flux2_pipeline(path: str | Path, kind: str = "flux2", seed: int = 0) -> Path:
    """Save `build_tiny_flux2_pipeline` as a diffusers folder; returns its path."""
    path = Path(path)
    build_tiny_flux2_pipeline(kind, seed).save_pretrained(str(path), safe_serialization=True)
    return path


def build_tiny_kontext_pipeline(seed: int = 0):
    """A tiny random-weight FLUX.1 Kontext pipeline: the tiny Flux-dev's encoders and transformer, with a VAE
    that shrinks 8x (Kontext resizes its reference image to about a megapixel, which a 2x VAE would make 65,536
    tokens)."""
    from sdcli.progress import quiet_libraries

    quiet_libraries()
    import torch
    from diffusers import AutoencoderKL, FluxKontextPipeline

    flux = build_tiny_flow_pipeline("flux", seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(4, 4, 4, 4), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=2, sample_size=32, layers_per_block=1, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    parts = {k: v for k, v in flux.components.items() if k != "vae"}
    return FluxKontextPipeline(**parts, vae=vae)


def save_tiny_kontext_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Save `build_tiny_kontext_pipeline` as a diffusers folder; returns its path."""
    path = Path(path)
    build_tiny_kontext_pipeline(seed).save_pretrained(str(path), safe_serialization=True)
    return path

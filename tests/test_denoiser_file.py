"""A denoiser from its own file (`sdcli.denoiser_file`): the transformer-only files people download (ComfyUI's
diffusion_models/ folder: the original code's names or diffusers', ComfyUI's prefix, bf16 or float8, or GGUF) go into
the base pipeline --model names, equal to the folder's own transformer and to diffusers' from_single_file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line, paths_of, pixels
try:  # one fixture (and one set of pipelines) with tests/families/, which import it under this name
    from newflow import new_flow_model  # noqa: F401 - fixture
except ImportError:  # this file run alone
    from families.newflow import new_flow_model  # noqa: F401 - fixture

SIZE = ("-W", "32", "-H", "32", "--steps", "2", "--seed", "3")
COMFY = "model.diffusion_model."


@pytest.fixture(scope="module")
def folders(new_flow_model, tiny_flux2_models, tiny_models):
    return {"zimage": new_flow_model("zimage"), "chroma": new_flow_model("chroma"),
            "qwenimage": new_flow_model("qwenimage"), "flux2": tiny_flux2_models["klein-distilled"],
            "sd1": tiny_models["sd1"]}


def _made(result):
    assert result.exit_code == 0, result.stderr
    (path,) = paths_of(result)
    return pixels(path), json.loads(Image.open(path).info["sdcli"]), path


def _state(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


# 1. The files people have, in each family ------------------------------------------------------------------


@pytest.mark.parametrize("family,original,prefix", [
    ("zimage", "zimage", ""),  # z_image_turbo_bf16.safetensors: the original names (fused qkv, final_layer)
    ("flux2", "flux2", COMFY),  # flux2 files: the original names under ComfyUI's prefix, which diffusers keeps
    ("chroma", None, COMFY),  # diffusers' names under ComfyUI's prefix (diffusers' converter takes neither)
    ("qwenimage", None, COMFY),  # qwen_image_*.safetensors: its original names are diffusers' own
    ("sd1", None, COMFY),  # --unet: a UNet alone in diffusers' names
])
def test_a_denoiser_file_gives_the_folders_image_and_diffusers_weights(cli, folders, tmp_path, family, original,
                                                                         prefix):
    import diffusers
    import torch
    from safetensors.torch import load_file

    from sdcli import denoiser_file
    from sdcli.testing import save_denoiser_file

    folder, name = folders[family], "unet" if family == "sd1" else "transformer"
    file = save_denoiser_file(folder, tmp_path / f"{family}.safetensors", original=original, prefix=prefix,
                              denoiser=name)
    image, record, path = _made(cli("generate", "a red circle", "-m", folder, *SIZE, f"--{name}", file, "-o",
                                    tmp_path / "file.png"))
    own, _, _ = _made(cli("generate", "a red circle", "-m", folder, *SIZE, "-o", tmp_path / "own.png"))
    # The same weights: the same image (±1: tensors read from a file sit at other memory alignments than the
    # folder's, which moves the CPU's matmul rounding in the last float bit).
    assert np.abs(image - own).max() <= 1
    assert record["denoiser_file"] == str(file)
    # Weight for weight what diffusers' from_single_file reads (given the prefix off where its converter keeps it),
    # and the folder's own.
    cls = getattr(diffusers, json.loads(Path(folder, name, "config.json").read_text())["_class_name"])
    ours = _state(denoiser_file.load(str(file), folder, name, cls.__name__, torch.float32, "--transformer"))
    tensors = {k.removeprefix(prefix): v for k, v in load_file(str(file)).items()}
    theirs = _state(cls.from_single_file(tensors, config=folder, subfolder=name, torch_dtype=torch.float32))
    folder_own = _state(cls.from_pretrained(folder, subfolder=name))
    assert ours.keys() == theirs.keys() == folder_own.keys()
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], folder_own[k]) for k in ours)
    if family == "zimage":  # recorded, and replayed from the image alone
        again, _, _ = _made(cli("generate", "--from-metadata", path, "-o", tmp_path / "again.png"))
        assert np.array_equal(again, image)


@pytest.mark.parametrize("float8,extra,tolerance", [
    ("plain", ("--storage-dtype", "float8"), 12),  # an fp8_e4m3fn file, kept in float8 by layerwise casting
    ("scaled", (), 12),  # ComfyUI's scaled fp8 ("fp8mixed"): each weight times its weight_scale
])
def test_a_float8_file_loads_as_the_weights_it_stores(cli, folders, tmp_path, float8, extra, tolerance):
    from sdcli.testing import save_denoiser_file

    folder = folders["zimage"]
    file = save_denoiser_file(folder, tmp_path / "z_fp8.safetensors", original="zimage", prefix=COMFY, float8=float8)
    image, record, _ = _made(cli("generate", "a red circle", "-m", folder, *SIZE, "--transformer", file, *extra,
                                 "-o", tmp_path / "fp8.png"))
    own, _, _ = _made(cli("generate", "a red circle", "-m", folder, *SIZE, "-o", tmp_path / "own.png"))
    # Rounded to float8, the same picture; the scales dropped (as diffusers alone does), weights hundreds of times
    # too large would not be.
    assert 0 < np.abs(image - own).max() <= tolerance and np.abs(image - own).mean() < 3


def test_a_gguf_of_a_new_family_in_its_original_names_loads(cli, folders, tmp_path):
    pytest.importorskip("gguf")
    from sdcli.testing import save_tiny_gguf

    folder = folders["zimage"]
    file = save_tiny_gguf(folder, tmp_path / "z-image-turbo-Q8_0.gguf", "Q8_0", original="zimage")
    image, record, _ = _made(cli("generate", "a red circle", "-m", folder, *SIZE, "--transformer", file, "-o",
                                 tmp_path / "g.png"))
    own, _, _ = _made(cli("generate", "a red circle", "-m", folder, *SIZE, "-o", tmp_path / "own.png"))
    assert record["denoiser_file"] == str(file)
    assert 0 < np.abs(image - own).max() <= 12


def test_each_file_is_one_familys(folders, tiny_flow_models, tiny_models, tmp_path):
    """The family checks in their order map each denoiser file, in either naming, to its own family alone."""
    from sdcli.denoiser_file import read_safetensors
    from sdcli.families import gguf_family
    from sdcli.testing import save_denoiser_file

    cases = [(folders[f], f, o, "transformer") for f, o in (("zimage", "zimage"), ("zimage", None),
                                                           ("flux2", "flux2"), ("flux2", None), ("chroma", None),
                                                           ("qwenimage", None))]
    cases += [(tiny_flow_models[f], f, None, "transformer") for f in ("flux", "sd3")]
    cases += [(tiny_models[f], {"sd1": "sd"}.get(f, f), None, "unet") for f in ("sd1", "sdxl")]
    for i, (folder, family, original, name) in enumerate(cases):
        file = save_denoiser_file(folder, tmp_path / f"{i}.safetensors", original=original, prefix=COMFY,
                                  denoiser=name)
        assert gguf_family(read_safetensors(file, "--transformer")).name == family, (family, original)


# 2. What does not fit, one line each, before the pipeline loads ---------------------------------------------


def _packed(path, folder):
    """A file whose weights are packed bytes (NVFP4/MXFP as ComfyUI's newest files store them)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(f"{folder}/transformer/diffusion_pytorch_model.safetensors")
    state = {k: (torch.zeros(v.shape[0], max(1, v.shape[-1] // 2), dtype=torch.uint8) if v.dim() == 2 else v)
             for k, v in state.items()}
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("which,code,words", [
    ("flux2", 1, "holds a transformer of the flux2 family, and --model"),
    ("vae", 1, "no denoiser sdcli knows"),
    ("ckpt", 2, "give the denoiser as a .safetensors or .gguf file"),
    ("truncated", 1, "truncated"),
    ("packed", 1, "packed in a quantized format diffusers cannot load"),
    ("missing", None, None),
    ("quantize", 2, "sdcli does not quantize a denoiser read from its own file"),
])
def test_a_file_that_does_not_fit_is_refused_in_one_line(cli, folders, tmp_path, no_pipeline_loads, which, code,
                                                         words):
    from sdcli.testing import save_denoiser_file

    zimage = folders["zimage"]
    files = {
        "flux2": lambda p: save_denoiser_file(folders["flux2"], p, original="flux2", prefix=COMFY),
        "vae": lambda p: save_denoiser_file(zimage, p, denoiser="vae"),
        "ckpt": lambda p: p.write_bytes(b"not read") and p,
        "truncated": lambda p: p.write_bytes(save_denoiser_file(zimage, p).read_bytes()[:-100]) and p,
        "packed": lambda p: _packed(p, zimage),
        "quantize": lambda p: save_denoiser_file(zimage, p, original="zimage"),
    }
    if which == "missing":  # a tensor short: named, before the pipeline around it loads
        from safetensors.torch import load_file, save_file

        path = save_denoiser_file(zimage, tmp_path / "z.safetensors", original="zimage")
        state = load_file(str(path))
        del state["layers.1.attention.qkv.weight"]
        save_file(state, str(path))
        line = one_error_line(cli("generate", "a", "-m", zimage, *SIZE, "--transformer", path))
        assert "lacks 3 of its tensors (layers.1.attention.to_k.weight" in line and not no_pipeline_loads
        return
    path = tmp_path / ("z.ckpt" if which == "ckpt" else f"{which}.safetensors")
    files[which](path)
    extra = ("--quantize", "int8-weight") if which == "quantize" else ()
    line = one_error_line(cli("generate", "a", "-m", zimage, *SIZE, "--transformer", path, *extra), code)
    path = path.name if which == "quantize" else path
    assert f"--transformer {path}" in line and words in line and not no_pipeline_loads


def test_a_flux2_file_as_the_model_names_the_way_that_loads(cli, folders, tmp_path):
    from sdcli.testing import save_denoiser_file

    path = save_denoiser_file(folders["flux2"], tmp_path / "flux2_dev_fp8mixed.safetensors", original="flux2")
    line = one_error_line(cli("generate", "a", "-m", path, *SIZE))
    assert "flux2 transformer alone" in line and "this file as --transformer" in line

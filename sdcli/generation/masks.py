"""Masks for inpainting and outpainting: read, feather, pad, and put the original back.

The model repaints the whole picture (the VAE's round trip alone changes every
pixel a little); what the user keeps must come back untouched. So, as
AUTOMATIC1111 does, the result is laid over the original with the feathered
mask: where the mask is black after feathering, the pixel is the original's,
exactly; where it is white, the model's; in between, a mix.
"""

from __future__ import annotations

from typing import Any

from sdcli.errors import DataError

ASPECT_TOLERANCE = 0.01  # a mask drawn on a resized copy of the image still fits


def read_mask(source: Any, image_size: tuple[int, int]):
    """The mask at ``source`` (a path, or a PIL image given in memory) as a black-and-white (L) image, checked
    against the image it is for.

    White (≥ 128) marks what to repaint, as in AUTOMATIC1111; any image mode is read
    (transparency flattens onto white). ``image_size`` is the init image's size as stored.
    """
    from sdcli.images import named, open_image

    mask = open_image(source, what="--mask", setting="mask").convert("L")
    (mw, mh), (iw, ih) = mask.size, image_size
    if abs(mw * ih - mh * iw) > ASPECT_TOLERANCE * mw * ih:
        raise DataError(f"--mask {named(source)} is {mw}x{mh}, another aspect ratio than the {iw}x{ih} init image; "
                        "draw the mask on the image itself (or a copy resized without cropping)", setting="mask")
    mask = mask.point(lambda v: 255 if v >= 128 else 0)
    if mask.getextrema()[1] == 0:
        raise DataError(f"--mask {named(source)} is all black: nothing to repaint (white marks what to repaint)",
                        setting="mask")
    return mask


def feather(mask: Any, size: tuple[int, int], blur: int):
    """``mask`` resized to ``size`` and blurred with a Gaussian of σ = ``blur`` pixels."""
    from PIL import Image, ImageFilter

    mask = mask.resize(size, Image.LANCZOS) if mask.size != size else mask
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask


def composite(generated: Any, original: Any, feathered: Any):
    """``generated`` laid under ``original`` as AUTOMATIC1111 lays it: the original's opacity is
    1 − min(2·mask, 1), so the mask's outer half fades and where it is 0 the original is kept exactly."""
    import numpy as np
    from PIL import Image

    weight = np.minimum(np.asarray(feathered, np.float32) * 2, 255)[..., None] / 255
    old = np.asarray(original.convert("RGB"), np.float32)
    new = np.asarray(generated.convert("RGB"), np.float32)
    mixed = old + (new - old) * weight  # exact where weight is 0 (old + 0) and where it is 1
    return Image.fromarray(np.rint(mixed).clip(0, 255).astype(np.uint8), "RGB")


def pad_canvas(image: Any, left: int, right: int, top: int, bottom: int):
    """The image on a larger canvas, the new border filled by repeating the edge pixels (a start the
    model can work from, unlike black), and the mask that marks that border white."""
    import numpy as np
    from PIL import Image

    pixels = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    canvas = Image.fromarray(pixels, "RGB")
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return canvas, mask

"""The one image loader, the overwrite check, the font and the labelled grid in `sdcli.images`."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sdcli import images
from sdcli.errors import DataError, OutputError
from sdcli.images import check_image, check_new_file, labelled_grid, open_image
from conftest import png_header_only


def close(pixel, expected, tolerance=0):
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


# ---------------------------------------------------------------- open_image


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide, 20 high: left half red, right half blue; orientation 6 says "rotate 90° clockwise to view".
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    upright = open_image(tmp_path / "phone.jpg")
    assert upright.size == (20, 40) and upright.mode == "RGB"
    # After the rotation the stored left (red) half is on top.
    assert close(upright.getpixel((10, 5)), (255, 0, 0), 40)
    assert close(upright.getpixel((10, 35)), (0, 0, 255), 40)
    assert check_image(tmp_path / "phone.jpg") == ((40, 20), None)  # the scan reports the size as stored


def test_transparency_is_flattened_onto_white(tmp_path):
    rgba = Image.new("RGBA", (30, 10), (255, 0, 0, 0))  # red, fully transparent: must not show
    rgba.paste((0, 255, 0, 255), (10, 0, 20, 10))  # opaque green
    rgba.paste((0, 0, 0, 128), (20, 0, 30, 10))  # half-transparent black
    rgba.save(tmp_path / "alpha.png")
    img = open_image(tmp_path / "alpha.png")
    assert img.mode == "RGB"
    assert img.getpixel((5, 5)) == (255, 255, 255)
    assert img.getpixel((15, 5)) == (0, 255, 0)
    assert close(img.getpixel((25, 5)), (127, 127, 127), 1)


def _palette_with_transparency(path):
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 10, 20, 200] + [0] * 762)
    p.paste(0, (0, 0, 4, 8))
    p.save(path, transparency=0)


@pytest.mark.parametrize("name,make,pixel", [
    ("grey.png", lambda p: Image.new("L", (8, 8), 128).save(p), (128, 128, 128)),
    ("grey-alpha.png", lambda p: Image.new("LA", (8, 8), (0, 0)).save(p), (255, 255, 255)),
    ("palette.png", lambda p: Image.new("P", (8, 8), 0).save(p), (0, 0, 0)),
    ("palette-clear.png", _palette_with_transparency, (255, 255, 255)),
    ("cmyk.tif", lambda p: Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p), (255, 0, 0)),
    # 16-bit greyscale: a plain convert("RGB") would clip 40000 to white; 40000 / 257 = 155.6 rounds to 156.
    ("sixteen.png", lambda p: Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(p), (156, 156, 156)),
])
def test_any_mode_becomes_rgb(tmp_path, name, make, pixel):
    make(tmp_path / name)
    img = open_image(tmp_path / name)
    assert img.mode == "RGB" and img.size == (8, 8)
    assert img.getpixel((0, 0)) == pixel


# A black-to-white gradient, 256 columns: column x should come out as 8-bit grey x in every mode.
GRADIENT = np.tile(np.arange(256, dtype=np.float64), (8, 1))


def _png_48bit(path):
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow writes none)."""
    values = np.repeat((GRADIENT * 257).astype(">u2")[..., None], 3, axis=2)
    raw = b"".join(b"\0" + row.tobytes() for row in values)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 256, 8, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _grey(mode):
    return Image.fromarray(GRADIENT.astype(np.uint8)).convert(mode)


def _lab():
    from PIL import ImageCms

    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    return ImageCms.applyTransform(_grey("RGB"), to_lab)


GRADIENTS = {  # file name -> (how to write it, the mode Pillow opens it in)
    "i16.png": (lambda p: Image.fromarray((GRADIENT * 257).astype(np.uint16)).save(p), "I;16"),
    "i16b.tif": (lambda p: Image.fromarray((GRADIENT * 257).astype(">u2")).save(p), "I;16B"),
    "i32.tif": (lambda p: Image.fromarray((GRADIENT * 257).astype(np.int32)).save(p), "I"),
    "float-unit.tif": (lambda p: Image.fromarray((GRADIENT / 255).astype(np.float32)).save(p), "F"),
    "float-255.tif": (lambda p: Image.fromarray(GRADIENT.astype(np.float32)).save(p), "F"),
    "rgb48.png": (_png_48bit, "RGB"),  # Pillow keeps the high byte of each 16-bit sample
    "la.png": (lambda p: _grey("LA").save(p), "LA"),
    "palette.png": (lambda p: _grey("P").save(p), "P"),
    "cmyk.tif": (lambda p: _grey("CMYK").save(p), "CMYK"),
    "cmyk.jpg": (lambda p: _grey("CMYK").save(p, quality=95), "CMYK"),
    "ycbcr.tif": (lambda p: _grey("RGB").convert("YCbCr").save(p), "YCbCr"),
    "lab.tif": (lambda p: _lab().save(p), "LAB"),
}


@pytest.mark.parametrize("name", sorted(GRADIENTS))
def test_every_mode_reads_as_the_same_8_bit_gradient(tmp_path, name):
    write, mode = GRADIENTS[name]
    write(tmp_path / name)
    assert Image.open(tmp_path / name).mode == mode  # the mode this case is about
    img = open_image(tmp_path / name)
    assert img.mode == "RGB" and img.size == (256, 8)
    got = np.asarray(img, dtype=np.float64)
    # Every channel of every column within a level or so of the column's grey (JPEG and LAB round trips: a few).
    assert np.abs(got - GRADIENT[..., None]).max() <= (6 if name.endswith(".jpg") or "lab" in name else 1)
    assert abs(got.mean() - 127.5) < 2


@pytest.mark.parametrize("mode", ["PA", "La", "1"])
def test_in_memory_modes_and_1_bit(mode):
    """PA and La exist only in memory; 1-bit is dithered, so only its average can be the gradient's."""
    img = _grey("L").convert("1") if mode == "1" else Image.merge(mode, (
        _grey("L").convert("P") if mode == "PA" else _grey("L"), Image.new("L", (256, 8), 255)))
    if mode == "La":  # premultiplied alpha Pillow cannot convert: refused in one line, not a traceback
        with pytest.raises(images._Unusable, match="refused: pixel mode La cannot be made RGB"):
            images._rgb(img)
        return
    got = np.asarray(images._rgb(img), dtype=np.float64)
    if mode == "1":
        assert abs(got.mean() - 127.5) < 3 and got[:, :64].mean() < 64 < 192 < got[:, -64:].mean()
    else:
        assert np.abs(got - GRADIENT[..., None]).max() <= 1


@pytest.mark.parametrize("name,values,why", [
    ("i32-wide.tif", (GRADIENT * 2**23).astype(np.int32), "32-bit integer pixels ranging 0..2139095040 have no "
                                                          "declared white level"),
    ("i32-negative.tif", (GRADIENT - 100).astype(np.int32), "32-bit integer pixels ranging -100..155"),
    ("float-hdr.tif", (GRADIENT * 4).astype(np.float32), "floating-point pixels ranging 0..1020 are neither 0..1 "
                                                         "nor 0..255"),
    ("float-nan.tif", np.where(GRADIENT > 100, np.nan, GRADIENT).astype(np.float32), "include NaN or infinity"),
])
def test_wide_modes_without_an_honest_8_bit_reading_are_refused(tmp_path, name, values, why):
    Image.fromarray(values).save(tmp_path / name)
    with pytest.raises(DataError) as err:
        open_image(tmp_path / name, what="--init-image")
    assert str(err.value).startswith(f"--init-image {tmp_path / name}: refused: ") and why in str(err.value)
    assert "\n" not in str(err.value)
    size, problem = check_image(tmp_path / name)  # the training scan skips it for the same reason
    assert size == (256, 8) and why in problem


def test_init_image_header_size_without_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (_ for _ in ()).throw(AssertionError("decoded")))
    assert images.image_size(tmp_path / "a.png") == (40, 30)
    bomb = png_header_only(tmp_path / "bomb.png", 12_000, 12_000)
    with pytest.raises(DataError, match=r"^--image .*bomb\.png: refused: 12000x12000 pixels is over"):
        images.image_size(bomb, what="--image")


def test_palette_transparency_only_where_the_palette_says(tmp_path):
    _palette_with_transparency(tmp_path / "p.png")
    img = open_image(tmp_path / "p.png")
    assert img.getpixel((1, 1)) == (255, 255, 255) and img.getpixel((6, 1)) == (10, 20, 200)


def test_oversized_image_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    # 100 megapixels: over our limit, under twice it (where Pillow itself only warns).
    bomb = png_header_only(tmp_path / "bomb.png", 10_000, 10_000)
    with pytest.raises(DataError) as err:
        open_image(bomb, what="--image")
    line = str(err.value)
    assert line.startswith(f"--image {bomb}: refused: 10000x10000 pixels is over the 89,478,485-pixel limit")
    assert "\n" not in line
    size, why = check_image(bomb)
    assert size == (10_000, 10_000) and why.startswith("refused: 10000x10000")
    # 400 megapixels: Pillow refuses in open(); still one line naming the file and the size.
    huge = png_header_only(tmp_path / "huge.png", 20_000, 20_000)
    with pytest.raises(DataError, match=r"huge\.png: refused as a decompression bomb.*400000000 pixels"):
        open_image(huge)


def test_limit_is_pixels_not_sides(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (10, 10)).save(tmp_path / "at.png")
    Image.new("RGB", (11, 10)).save(tmp_path / "over.png")
    assert open_image(tmp_path / "at.png").size == (10, 10)
    with pytest.raises(DataError, match="11x10 pixels is over the 100-pixel limit"):
        open_image(tmp_path / "over.png")


def test_unreadable_missing_truncated(tmp_path):
    (tmp_path / "fake.jpg").write_text("not a JPEG")
    with pytest.raises(DataError, match=r"^--init-image .*fake\.jpg: not a readable image"):
        open_image(tmp_path / "fake.jpg")
    with pytest.raises(DataError, match=r"gone\.png: no such file"):
        open_image(tmp_path / "gone.png")
    with pytest.raises(DataError, match="is a folder"):
        open_image(tmp_path)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    # The header opens fine; only decoding every pixel finds the cut.
    with pytest.raises(DataError, match=r"cut\.png: not a readable image"):
        open_image(tmp_path / "cut.png")
    size, why = check_image(tmp_path / "cut.png")
    assert size == (64, 64) and why.startswith("unreadable (")
    assert check_image(tmp_path / "fake.jpg") == ((0, 0), "unreadable (not a format Pillow can read)")


# ---------------------------------------------------------------- images given in memory (from Python)


def _rgba():
    rgba = Image.new("RGBA", (30, 10), (255, 0, 0, 0))
    rgba.paste((0, 255, 0, 255), (10, 0, 20, 10))
    rgba.paste((0, 0, 0, 128), (20, 0, 30, 10))
    return rgba


def _exif_rotated():
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    stored.getexif()[0x0112] = 6  # "rotate 90° clockwise to view", on the image in memory
    return stored


def _palette_clear():
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 10, 20, 200] + [0] * 762)
    p.paste(0, (0, 0, 4, 8))
    p.info["transparency"] = 0
    return p


MADE_IN_MEMORY = {"rgba": _rgba, "exif-rotated": _exif_rotated, "palette-clear": _palette_clear,
                  "sixteen": lambda: Image.fromarray(np.full((8, 8), 40000, np.uint16)),
                  "grey-alpha": lambda: Image.new("LA", (8, 8), (0, 0))}


@pytest.mark.parametrize("name", sorted(MADE_IN_MEMORY))
def test_an_image_made_in_memory_reads_as_the_same_image_saved_as_png_and_read_back(tmp_path, name):
    made = MADE_IN_MEMORY[name]()
    before = (made.mode, made.size, made.tobytes())
    made.save(tmp_path / "saved.png", exif=made.getexif())
    ours = open_image(made)
    assert ours.mode == "RGB" and np.array_equal(np.asarray(ours), np.asarray(open_image(tmp_path / "saved.png")))
    assert ours.size == ((20, 40) if name == "exif-rotated" else made.size)  # upright in memory too
    assert (made.mode, made.size, made.tobytes()) == before  # the caller's image is left as it was
    assert images.image_size(made) == images.image_size(tmp_path / "saved.png")  # as stored, as a header says


@pytest.mark.parametrize("name", sorted(GRADIENTS))
def test_a_file_opened_in_memory_reads_as_the_file_does(tmp_path, name):
    write, _mode = GRADIENTS[name]
    write(tmp_path / name)
    with Image.open(tmp_path / name) as lazy:  # not yet decoded, as Image.open hands it over
        assert np.array_equal(np.asarray(open_image(lazy)), np.asarray(open_image(tmp_path / name)))


def test_an_image_in_memory_is_refused_as_its_file_would_be(monkeypatch):
    nan = Image.fromarray(np.where(GRADIENT > 100, np.nan, GRADIENT).astype(np.float32))
    with pytest.raises(DataError) as err:
        open_image(nan, what="--mask", setting="mask")
    assert str(err.value) == ("--mask (a 256x8 F image given in memory): refused: floating-point pixels include NaN "
                              "or infinity; save it as 8- or 16-bit") and err.value.setting == "mask"
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    for read in (open_image, images.image_size):
        with pytest.raises(DataError, match=r"^--init-image \(a 11x10 RGB image given in memory\): refused: 11x10 "
                                            "pixels is over the 100-pixel limit"):
            read(Image.new("RGB", (11, 10)))
    from sdcli.errors import UsageError

    with pytest.raises(UsageError, match="^--control-image takes a file path or a PIL image, not ndarray$"):
        open_image(np.zeros((8, 8, 3), np.uint8), what="--control-image")


# ---------------------------------------------------------------- writing


def test_one_overwrite_check(tmp_path):
    target = tmp_path / "a.png"
    assert check_new_file(target, overwrite=False) == target  # nothing there yet
    target.write_bytes(b"old")
    with pytest.raises(OutputError, match="a.png exists; pass --overwrite to replace it"):
        check_new_file(target, overwrite=False)
    assert check_new_file(target, overwrite=True) == target
    with pytest.raises(OutputError, match=r"^--out .* is a folder; give a file name"):
        check_new_file(tmp_path, overwrite=True, flag="--out")
    # atomic_write goes through the same check and leaves the old file alone.
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        images.atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"old"


# ---------------------------------------------------------------- drawing


def test_font_draws_the_schedule_symbols():
    font = images.font(14)
    # A font without ᾱ draws the same placeholder box for it as for α; DejaVu adds the macron above.
    assert font.getbbox("ᾱ") != font.getbbox("α")
    assert font.getbbox("√") != font.getbbox("\uffff")


def test_labelled_grid_places_zoomed_cells_and_captions():
    colours = [[(200, 0, 0), (0, 200, 0), (0, 0, 200)], [(200, 200, 0), (0, 200, 200), (200, 0, 200)]]
    tiles = [[Image.new("RGB", (16, 16), c) for c in row] for row in colours]
    plain = labelled_grid(tiles, ["a", "b", "c"], ["one", "two"], title="t")
    captioned = labelled_grid(tiles, row_labels=["one", "two"], captions=[["x\ny"] * 3, ["z\nw"] * 3])
    for sheet in (plain, captioned):
        arr = np.asarray(sheet)
        for r in range(2):
            for c in range(3):
                # Each tile enlarged to 96x96 by nearest neighbour: a solid block of its own colour.
                hits = np.all(arr == colours[r][c], axis=-1)
                assert hits.sum() == 96 * 96
    # Two caption lines under each row outweigh the title and column-label lines the captioned sheet lacks.
    assert captioned.height > plain.height
    below = np.asarray(captioned.convert("L"))
    first = np.argwhere(np.all(np.asarray(captioned) == colours[0][0], axis=-1))
    y0, x0 = first.min(axis=0)
    assert (below[y0 + 96: y0 + 96 + 30, x0: x0 + 40] < 100).any()  # caption text under the first tile


def test_schedule_strip_is_the_same_grid():
    from sdcli.schedule.report import strip

    tile = Image.new("RGB", (16, 16), (250, 150, 0))
    one = strip([("only", [tile, tile], ["t = 0", "t = 1"])], "title")
    two = strip([("a", [tile, tile], ["t = 0", "t = 1"]), ("b", [tile, tile], ["t = 0", "t = 1"])], "title")
    assert np.all(np.asarray(one) == (250, 150, 0), axis=-1).sum() == 2 * 96 * 96
    assert two.width > one.width  # row labels only when there is more than one row

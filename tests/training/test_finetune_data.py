"""Finding captioned images, refusing what cannot train, and turning an image into pixels."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from sdcli.errors import DataError
from sdcli.training.data import (batches_per_epoch, discover, epoch_batches, load_rgb, rank_share, shuffle_tags,
                                 to_pixels)
from conftest import png_header_only


def test_sidecar_captions_any_mode_and_subfolders(tmp_path, make_images):
    root = tmp_path / "data"
    make_images(root, n=2)
    sub = root / "more" / "deeper"
    sub.mkdir(parents=True)
    Image.new("RGBA", (20, 16), (255, 0, 0, 0)).save(sub / "clear.png")  # fully transparent
    Image.new("L", (16, 24), 128).save(sub / "grey.jpg")
    Image.new("P", (16, 16), 3).save(sub / "palette.webp")
    for name in ("clear", "grey", "palette"):
        (sub / f"{name}.txt").write_text(f"  caption of {name}\n")
    (root / "notes.md").write_text("not an image")
    report = discover(root)
    names = [e.path.name for e in report.examples]
    assert names == ["img00.png", "img01.png", "clear.png", "grey.jpg", "palette.webp"]
    assert report.examples[2].caption == "caption of clear"
    assert report.caption_sources[".txt"] == 5
    assert report.ignored == {".md": 1}
    for example in report.examples:
        assert load_rgb(example.path).mode == "RGB"
    # Transparency is flattened onto white, not left as whatever colour hides under alpha 0.
    assert load_rgb(sub / "clear.png").getpixel((0, 0)) == (255, 255, 255)


def test_metadata_jsonl_csv_and_caption_column(tmp_path, make_images):
    root = tmp_path / "data"
    make_images(root, n=2, captions="jsonl")
    (root / "img00.txt").write_text("the sidecar loses to metadata")
    sub = root / "part2"
    make_images(sub, n=2, captions="none")
    (sub / "metadata.csv").write_text('file_name,text,caption\nimg00.png,unused,"a cat, in a box"\nimg01.png,x,a dog\n')
    with pytest.raises(DataError, match=r"metadata.jsonl has no caption column 'caption' \(columns: file_name, text\)"):
        discover(root, caption_column="caption")
    report = discover(root)
    captions = {str(e.path.relative_to(root)): e.caption for e in report.examples}
    assert captions == {"img00.png": "a red circle", "img01.png": "a blue square",
                        "part2/img00.png": "unused", "part2/img01.png": "x"}
    assert report.caption_sources == {"metadata.jsonl": 2, "metadata.csv": 2}
    (root / "metadata.jsonl").unlink()
    (root / "img01.txt").write_text("a blue square")
    (root / "img00.txt").write_text("a red circle")
    report = discover(root, caption_column="caption")
    assert [e.caption for e in report.examples] == ["a red circle", "a blue square", "a cat, in a box", "a dog"]


CAFE = "un café crème, 東京"


@pytest.mark.parametrize("encode", [
    lambda text: text.encode("utf-8"),
    lambda text: text.encode("utf-8-sig"),  # Notepad's and Excel's UTF-8, with its byte-order mark
    lambda text: text.encode("utf-16"),  # with its byte-order mark (Windows' "Unicode")
    lambda text: b"\xfe\xff" + text.encode("utf-16-be"),
    lambda text: text.encode("utf-32"),
], ids=["utf-8", "utf-8-bom", "utf-16-le-bom", "utf-16-be-bom", "utf-32-bom"])
@pytest.mark.parametrize("where", ["sidecar", "metadata.csv"])
def test_captions_are_decoded_by_their_byte_order_mark(tmp_path, make_images, encode, where):
    root = tmp_path / "data"
    make_images(root, n=1, captions="txt" if where == "sidecar" else "none")
    if where == "sidecar":
        (root / "img00.txt").write_bytes(encode(CAFE))
    else:
        (root / "metadata.csv").write_bytes(encode(f'file_name,text\nimg00.png,"{CAFE}"\n'))
    assert [e.caption for e in discover(root).examples] == [CAFE]


@pytest.mark.parametrize("make,offset", [
    (lambda head: (head + "un café").encode("latin-1"), 6),  # Windows-1252 / Latin-1: é is 0xe9
    (lambda head: (head + "a\u00e9").encode("cp1252") + b" ok", 1),
    (lambda head: b"\xff\xfe" + (head + "odd").encode("utf-16-le")[:-1], 6),  # UTF-16 cut inside a character
], ids=["latin-1", "cp1252", "broken-utf-16"])
@pytest.mark.parametrize("where", ["sidecar", "metadata.csv"])
def test_a_caption_file_in_another_encoding_is_refused_naming_it_and_the_byte(tmp_path, make_images, make, offset,
                                                                                where):
    # It used to train on U+FFFD in place of the caption's letters, silently.
    root = tmp_path / "data"
    make_images(root, n=1, captions="txt" if where == "sidecar" else "none")
    sub = root / "part"
    make_images(sub, n=1, captions="none")
    name, head = ("img00.txt", "") if where == "sidecar" else ("metadata.csv", "file_name,text\nimg00.png,")
    raw = make(head)
    offset += len(raw) - len(make(""))  # the caption's bad byte, after the CSV's head
    (sub / name).write_bytes(raw)
    with pytest.raises(DataError, match=rf"^part/{name} is not UTF-.* text: byte {offset} \(0x[0-9a-f]{{2}}\)"):
        discover(root)


def test_truncated_image_is_skipped_with_a_warning_or_stops_with_strict(tmp_path, make_images):
    root = tmp_path / "data"
    make_images(root, n=2, size=(64, 64))
    broken = root / "img01.png"
    broken.write_bytes(broken.read_bytes()[:-120])  # cut into the pixel data
    warnings = []
    report = discover(root, warn=warnings.append)
    assert [e.path.name for e in report.examples] == ["img00.png"]
    assert len(warnings) == 1 and "img01.png" in warnings[0] and "truncated" in warnings[0]
    assert any("skipped img01.png" in line for line in report.lines())
    with pytest.raises(DataError, match="img01.png"):
        discover(root, strict=True)


def test_garbage_with_an_image_suffix_is_skipped(tmp_path, make_images):
    root = tmp_path / "data"
    make_images(root, n=1)
    (root / "fake.jpg").write_bytes(b"not a jpeg at all")
    (root / "fake.txt").write_text("a caption")
    report = discover(root)
    assert [e.path.name for e in report.examples] == ["img00.png"]
    assert report.skipped[0][0] == "fake.jpg" and "unreadable" in report.skipped[0][1]


def test_missing_caption_is_an_error_naming_the_image_unless_allowed(tmp_path, make_images):
    root = tmp_path / "data"
    make_images(root, n=3)
    (root / "img01.txt").unlink()
    (root / "img02.txt").write_text("   \n")  # empty counts as missing
    with pytest.raises(DataError, match=r"img01.png has no caption.*--allow-empty-captions"):
        discover(root)
    report = discover(root, allow_empty_captions=True)
    assert [e.caption for e in report.examples] == ["a red circle", None, None]
    assert "2 without, trained as the null prompt" in "\n".join(report.lines())


def test_empty_folder_and_missing_folder_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no usable images .* in .*empty"):
        discover(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "sub/../../outside.png"])
def test_file_name_pointing_outside_data_is_refused(tmp_path, make_images, name):
    root = tmp_path / "data"
    make_images(root, n=1)
    Image.new("RGB", (16, 16)).save(tmp_path / "outside.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "x"}) + "\n")
    with pytest.raises(DataError, match=f"line 1: file_name '{name}' points outside --data"):
        discover(root)


def test_metadata_naming_a_missing_file_is_an_error(tmp_path, make_images):
    root = tmp_path / "data"
    make_images(root, n=1)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(DataError, match="gone.png, which does not exist"):
        discover(root)


def test_decompression_bomb_is_refused_before_decoding(tmp_path, make_images):
    root = tmp_path / "data"
    make_images(root, n=1)
    png_header_only(root / "bomb.png", 50_000, 50_000)  # 2.5 gigapixels declared in 60 bytes
    (root / "bomb.txt").write_text("boom")
    report = discover(root)
    assert [e.path.name for e in report.examples] == ["img00.png"]
    assert report.skipped[0][0] == "bomb.png" and "decompression bomb" in report.skipped[0][1]
    with pytest.raises(DataError, match="bomb.png.*decompression bomb"):
        discover(root, strict=True)


def test_report_lists_sizes_and_upscaling(tmp_path, make_images):
    root = tmp_path / "data"
    make_images(root, n=2, size=(32, 24))
    make_images(root / "small", n=1, size=(8, 8))
    text = "\n".join(discover(root).lines(resolution=16))
    assert "3 images" in text and "32x24 ×2" in text and "8x8 ×1" in text
    assert "1 smaller than --resolution 16 will be upscaled" in text


def test_pixels_center_crop_random_crop_and_flip():
    image = Image.new("RGB", (48, 16), (0, 0, 0))
    image.paste((255, 255, 255), (24, 0, 48, 16))  # right half white
    px, (top, left) = to_pixels(image, 16, center=True)
    assert px.shape == (3, 16, 16) and px.min() >= -1 and px.max() <= 1
    assert (top, left) == (0, 16)
    assert px[:, :, :6].max() < -0.9 and px[:, :, -6:].min() > 0.9  # the centre straddles the edge
    px, (_, left) = to_pixels(image, 16, center=False, frac=(0.0, 0.0))
    assert left == 0 and px.max() < -0.9  # leftmost square: all black
    px, (_, left) = to_pixels(image, 16, center=False, frac=(0.0, 0.999))
    assert left == 32 and px.min() > 0.9  # rightmost square: all white
    flipped, (_, left) = to_pixels(image, 16, center=True, flip=True)
    assert (flipped == to_pixels(image, 16)[0].flip(-1)).all()
    assert left == 48 - 16 - 16  # crop measured from the mirrored side


def test_epoch_order_is_a_seeded_permutation_shared_by_all_ranks():
    groups = [list(range(10))]  # one size: no buckets
    a = epoch_batches(groups, epoch=0, seed=1, flip=True, uncond_prob=0.1, batch=4)
    assert len(a) == batches_per_epoch(groups, 4) == 3 and all(len(b) == 4 for b in a)
    first_pass = [it for b in a for it in b][:10]
    assert sorted(it.index for it in first_pass) == list(range(10))  # a permutation; the last batch wraps
    assert a == epoch_batches(groups, epoch=0, seed=1, flip=True, uncond_prob=0.1, batch=4)
    assert a != epoch_batches(groups, epoch=1, seed=1, flip=True, uncond_prob=0.1, batch=4)
    # Two ranks with 2 each split every global batch of 4 between them, without overlap.
    for batch in a:
        assert rank_share(batch, 2, 0) + rank_share(batch, 2, 1) == batch


def test_every_batch_holds_one_bucket_and_repeats_weigh_an_example():
    # Bucket A: examples 0-2, example 2 repeated 3 times; bucket B: examples 3-6.
    groups = [[0, 1, 2, 2, 2], [3, 4, 5, 6]]
    batches = epoch_batches(groups, epoch=0, seed=5, flip=False, uncond_prob=0.0, batch=2)
    assert len(batches) == batches_per_epoch(groups, 2) == 3 + 2
    for b in batches:
        assert {it.index for it in b} <= set(groups[0]) or {it.index for it in b} <= set(groups[1])
    seen = [it.index for b in batches for it in b]
    assert seen.count(2) >= 3 and sorted(set(seen)) == list(range(7))
    # The batches of the two buckets are interleaved in some epoch, not always A's then B's.
    orders = {tuple(b[0].index in groups[0] for b in epoch_batches(groups, e, 5, False, 0.0, 2)) for e in range(8)}
    assert len(orders) > 1


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3])
def test_caption_dropout_rate_matches_uncond_prob(p):
    groups, epochs = [list(range(300)), list(range(300, 500))], 40  # 20,000 draws: standard error 0.002 at p=0.1

    def items(epoch, flip=True):
        return [it for b in epoch_batches(groups, epoch, seed=0, flip=flip, uncond_prob=p, batch=100) for it in b]

    drops = [it.drop for e in range(epochs) for it in items(e)]
    rate = sum(drops) / len(drops)
    assert abs(rate - p) < 0.01
    flips = [it.flip for e in range(4) for it in items(e)]
    assert abs(sum(flips) / len(flips) - 0.5) < 0.05
    assert not any(it.flip for it in items(0, flip=False))


def test_shuffled_tags_keep_the_first_n_and_follow_the_seed():
    caption = "sks dog, photo, outdoors, grass, , sunny, from above"
    tags = ["sks dog", "photo", "outdoors", "grass", "sunny", "from above"]
    orders = {shuffle_tags(caption, 1, seed) for seed in range(40)}
    assert len(orders) > 20  # 120 orders of the last five
    for order in orders:
        parts = order.split(", ")
        assert parts[0] == "sks dog" and sorted(parts) == sorted(tags)
    assert shuffle_tags(caption, 2, 7) == shuffle_tags(caption, 2, 7)
    assert all(s.startswith("sks dog, photo, ") for s in (shuffle_tags(caption, 2, seed) for seed in range(10)))
    assert shuffle_tags("one tag", 0, 3) == "one tag"


# ---------------------------------------------------------------------------
# Text as people save it, links out of the folder, and captions the text encoder cannot read whole


@pytest.mark.parametrize("kind", ["csv", "jsonl", "txt"])
def test_text_saved_with_a_byte_order_mark_is_read(tmp_path, make_images, kind):
    root = tmp_path / "data"
    make_images(root, n=2, captions=kind)
    for text_file in [root / f"metadata.{kind}"] if kind != "txt" else sorted(root.glob("*.txt")):
        text_file.write_bytes(text_file.read_text(encoding="utf-8").encode("utf-8-sig"))  # as Excel saves UTF-8
        assert text_file.read_bytes().startswith(b"\xef\xbb\xbf")
    report = discover(root)
    assert [e.caption for e in report.examples] == ["a red circle", "a blue square"]  # no \ufeff in the first


def test_symlink_out_of_data_is_skipped_with_a_warning_naming_it(tmp_path, make_images):
    root = tmp_path / "data"
    make_images(root, n=2)
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("a private note")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "elsewhere" / "outside.png")
    (root / "img01.txt").unlink()
    (root / "img01.txt").symlink_to(secret)  # a caption that would read a file outside --data
    (root / "linked.png").symlink_to(tmp_path / "elsewhere" / "outside.png")
    (root / "linked.txt").write_text("a linked picture")
    (root / "again.png").symlink_to(root / "img00.png")  # a link that stays inside is fine
    (root / "again.txt").write_text("the same picture")
    warnings = []
    report = discover(root, allow_empty_captions=True, warn=warnings.append)
    assert {e.path.name: e.caption for e in report.examples} == {
        "again.png": "the same picture", "img00.png": "a red circle", "img01.png": None}
    assert sorted(rel for rel, _ in report.skipped) == ["img01.txt", "linked.png"]
    assert any(w.startswith("warning: skipping img01.txt: a symlink to ") and str(secret) in w
               and w.endswith("outside --data") for w in warnings)
    assert "a private note" not in repr(report)
    with pytest.raises(DataError, match=r"^(img01\.txt|linked\.png): a symlink to .*outside --data"):
        discover(root, allow_empty_captions=True, strict=True)


def test_nul_bytes_in_a_caption_are_removed_with_a_warning_naming_the_file(tmp_path, make_images):
    root = tmp_path / "data"
    make_images(root, n=2)
    (root / "img00.txt").write_bytes(b"a red\x00 circle\x00")
    sub = root / "sub"
    make_images(sub, n=1, captions="none")
    (sub / "metadata.jsonl").write_text(json.dumps({"file_name": "img00.png", "text": "a\u0000 cat"}) + "\n")
    warnings = []
    report = discover(root, warn=warnings.append)
    assert [e.caption for e in report.examples] == ["a red circle", "a blue square", "a cat"]
    assert warnings == ["warning: removed 2 NUL byte(s) from the caption of img00.png (from img00.txt)",
                        "warning: removed 1 NUL byte(s) from the caption of sub/img00.png (from metadata.jsonl)"]


def _tiny_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    from sdcli.testing import write_clip_tokenizer

    return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path / "tok", max_length=77)))


def test_captions_past_the_token_limit_are_counted_and_named(tmp_path, make_images):
    from sdcli.training.data import long_captions

    root = tmp_path / "data"
    make_images(root, n=4)
    tokenizer = _tiny_tokenizer(tmp_path)
    assert long_captions(discover(root), tokenizer) is None
    for i in range(4):  # every word is one token: 75 words + start and end make 77, the limit exactly
        (root / f"img{i:02d}.txt").write_text(" ".join(["red"] * (75 + i)))
    line = long_captions(discover(root), tokenizer)
    assert line == ("warning: 3 captions longer than the text encoder's 77 tokens (the longest 80) will be cut "
                    "there: img01.png, img02.png, img03.png")
    make_images(root / "more", n=1)
    (root / "more" / "img00.txt").write_text("red " * 500)
    assert long_captions(discover(root), tokenizer).startswith("warning: 4 captions longer than the text encoder's "
                                                               "77 tokens (the longest 502) will be cut there: "
                                                               "img01.png, img02.png, img03.png, ...")


def test_finetune_says_how_many_captions_are_too_long_before_training(tiny_sd, tmp_path, make_images, make_config,
                                                                      capsys):
    from sdcli.training import finetune

    root = tmp_path / "data"
    make_images(root, n=2)
    (root / "img01.txt").write_text("a blue square " * 40)
    finetune(make_config(root, tmp_path / "out", tiny_sd, max_steps=1, quiet=False))
    err = capsys.readouterr().err
    assert "warning: 1 caption longer than the text encoder's 77 tokens (the longest 122) will be cut there: " \
           "img01.png" in err
    assert err.index("will be cut there") < err.index("training LoRA")  # said before training starts

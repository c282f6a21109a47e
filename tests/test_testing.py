"""The offline helpers tests and examples are built on."""

from sdcli.testing import _WORDS, write_clip_tokenizer


def test_every_word_of_the_tiny_tokenizer_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path)))
    split = [w for w in _WORDS if len(tok(w, add_special_tokens=False).input_ids) != 1]
    assert split == []
    # Unknown words still tokenize, byte by byte.
    assert len(tok("zebra", add_special_tokens=False).input_ids) > 1

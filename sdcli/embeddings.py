"""Textual-inversion embeddings: AUTOMATIC1111 .pt/.safetensors files and diffusers learned_embeds.

An embedding is a few learned token vectors. Each is added to the tokenizer as a
new token (a multi-vector one as T, T_1, T_2, ..., diffusers' naming, so
`--prompt-syntax plain` reads it too) and its vectors become those tokens' rows
of the text encoder's embedding table. SDXL needs vectors for both text
encoders (AUTOMATIC1111 writes them as `clip_l` and `clip_g`).

Parsing, checks and records need only the standard library; torch and
safetensors are imported where the vectors are read.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from sdcli.errors import DataError, ModelError, UsageError

PICKLED = (".pt", ".bin", ".ckpt", ".pth")
_A1111_KEYS = {"emb_params", "clip_l", "clip_g", "string_to_param"}


# 1. The option and the record -------------------------------------------------------------------


def parse_embedding(spec: str) -> tuple[str, str]:
    """'path/to/easyneg.safetensors:EasyNeg' -> (path, 'EasyNeg'); without a token, `default_token(path)`."""
    path, token = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and not any(c in tail for c in "/\\") and not Path(spec).expanduser().exists():
        path, token = head, tail
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"--embedding: no such file: {path}")
    return str(file), token or default_token(file)


def default_token(path: Path) -> str:
    """A diffusers learned_embeds file names its token (its one key); any other file is called by its stem."""
    if path.suffix.lower() == ".safetensors":
        keys = [k for k in _safetensors_keys(path) if k != "__metadata__"]
        if len(keys) == 1 and keys[0] not in _A1111_KEYS:
            return keys[0]
    return path.stem


def _safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a .safetensors header (8-byte length, then JSON), without loading anything."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                return []
            return list(json.loads(f.read(length)))
    except (OSError, ValueError, struct.error):
        return []  # not readable as safetensors: loading says so in one line


def check_embeddings(embeddings: list[tuple[str, str]], allow_pickle: bool) -> None:
    """Cheap checks before anything loads: tokens usable and distinct, pickles allowed."""
    seen: dict[str, str] = {}
    for path, token in embeddings:
        if not token or any(c.isspace() for c in token):
            raise UsageError(f"--embedding {path}: the token {token!r} must be one word")
        if token in seen:
            raise UsageError(f"--embedding: {path} and {seen[token]} both use the token {token!r}; "
                             "name one another way with PATH:TOKEN")
        seen[token] = path
        if Path(path).suffix.lower() in PICKLED and not allow_pickle:
            raise UsageError(f"--embedding {path} holds pickled data, which can run code when loaded; "
                             "convert it to .safetensors or pass --allow-pickle if you trust it")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embeddings_to_record(embeddings: list[tuple[str, str]]) -> list[dict[str, str]]:
    from sdcli.pipeline import absolute_if_local

    return [{"path": absolute_if_local(path), "token": token, "sha256": file_sha256(path)}
            for path, token in embeddings]


def embeddings_from_record(value: list[dict[str, str]] | None) -> list[tuple[str, str]]:
    """The recorded embeddings, each checked to be the very file the image was made with."""
    out = []
    for e in value or []:
        path = Path(e["path"])
        if not path.is_file():
            raise DataError(f"the embedding {e['token']!r} this image was made with is gone: no such file {path}")
        if e.get("sha256") and file_sha256(path) != e["sha256"]:
            raise DataError(f"the embedding file {path} changed since this image was made (its sha256 differs)")
        out.append((str(path), e["token"]))
    return out


def ti_hashes(value: list[dict[str, str]] | None) -> str | None:
    """AUTOMATIC1111's `TI hashes` field: "name: first 12 hex digits of the file's sha256", quoted."""
    if not value:
        return None
    names = (e["token"].replace(":", "").replace(",", "") for e in value)  # AUTOMATIC1111 drops these too
    return json.dumps(", ".join(f"{name}: {e['sha256'][:12]}" for name, e in zip(names, value)))


# 2. Loading -------------------------------------------------------------------------------------


def read_vectors(path: str, allow_pickle: bool) -> dict[str, Any]:
    """An embedding file's vectors: {"": (n, width)} for one text encoder, {"clip_l", "clip_g"} for SDXL."""
    import torch

    name = Path(path).name
    try:
        if Path(path).suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(path)
        elif allow_pickle:
            data = torch.load(path, map_location="cpu", weights_only=False)
        else:  # check_embeddings refuses these earlier; this keeps the library call safe on its own
            raise UsageError(f"--embedding {path} holds pickled data; pass --allow-pickle if you trust it")
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise DataError(f"--embedding {name} cannot be read: {' '.join(str(exc).split())[:200]}") from None
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):  # AUTOMATIC1111's .pt
        data = data["string_to_param"]
    if not isinstance(data, dict):
        raise DataError(f"--embedding {name} is not a textual-inversion embedding")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if "clip_l" in tensors and "clip_g" in tensors:
        found = {"clip_l": tensors["clip_l"], "clip_g": tensors["clip_g"]}
    elif "emb_params" in tensors:
        found = {"": tensors["emb_params"]}
    elif len(tensors) == 1:  # diffusers' {token: vectors}, or AUTOMATIC1111's {"*": vectors}
        found = {"": next(iter(tensors.values()))}
    else:
        raise DataError(f"--embedding {name} is not a textual-inversion embedding "
                        f"(tensors: {', '.join(sorted(tensors))[:120] or 'none'})")
    out = {}
    for key, vectors in found.items():
        vectors = vectors.detach().float()
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or not len(vectors):
            raise DataError(f"--embedding {name}: vectors of shape {tuple(vectors.shape)}, expected (tokens, width)")
        out[key] = vectors
    return out


def load_embeddings(pipe: Any, embeddings: list[tuple[str, str]], allow_pickle: bool) -> None:
    """Add each embedding's token to the pipeline's tokenizer(s) and its vectors to the text encoder(s)."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    for path, token in embeddings:
        vectors = read_vectors(path, allow_pickle)
        name = Path(path).name
        if sdxl:
            if "clip_g" not in vectors:
                raise DataError(f"--embedding {name} holds vectors for one text encoder (SD 1.x/2.x); SDXL needs "
                                "vectors for both (clip_l and clip_g)")
            targets = [(pipe.tokenizer, pipe.text_encoder, vectors["clip_l"], "clip_l"),
                       (pipe.tokenizer_2, pipe.text_encoder_2, vectors["clip_g"], "clip_g")]
            targets = [t for t in targets if t[1] is not None]
        else:
            if "" not in vectors:
                raise DataError(f"--embedding {name} holds SDXL vectors (clip_l and clip_g); this model has one "
                                "text encoder")
            targets = [(pipe.tokenizer, pipe.text_encoder, vectors[""], "")]
        for tokenizer, model, rows, part in targets:  # check all before changing any
            _check_fits(tokenizer, model, rows, token, f"{name}{' ' + part if part else ''}")
        for tokenizer, model, rows, _part in targets:
            _add_token(tokenizer, model, rows, token)


def _check_fits(tokenizer: Any, model: Any, rows: Any, token: str, what: str) -> None:
    width = model.get_input_embeddings().weight.shape[1]
    if rows.shape[1] != width:
        raise ModelError(f"--embedding {what} is {rows.shape[1]} wide but this model's text encoder takes {width} "
                         "(the embedding was made for another model family)")
    if len(tokenizer.tokenize(token)) == 1 or token in tokenizer.get_vocab():
        raise UsageError(f"--embedding: the token {token!r} is already in this model's vocabulary; give the "
                         "embedding another name with PATH:TOKEN")
    limit = min(tokenizer.model_max_length or 77, model.config.max_position_embeddings) - 2
    if len(rows) > limit:
        raise ModelError(f"--embedding {what} has {len(rows)} vectors, more than a prompt chunk holds ({limit})")


def _add_token(tokenizer: Any, model: Any, rows: Any, token: str) -> None:
    import torch

    names = [token] + [f"{token}_{i}" for i in range(1, len(rows))]
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    rows_now = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(max(len(tokenizer), rows_now), mean_resizing=False)
    table = model.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = rows.to(table.dtype).to(table.device)

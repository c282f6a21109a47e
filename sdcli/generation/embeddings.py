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

from sdcli.errors import DataError, ModelError, UsageError, concerning

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


@concerning("embeddings")
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
        for other, other_path in seen.items():
            if _numbered(token, other) or _numbered(other, token):
                raise UsageError(f"--embedding: the tokens {other!r} ({Path(other_path).name}) and {token!r} "
                                 f"({Path(path).name}) collide: a multi-vector embedding T takes T_1, T_2, ...; "
                                 "name one another way with PATH:TOKEN")
        if Path(path).suffix.lower() in PICKLED and not allow_pickle:
            raise UsageError(f"--embedding {path} holds pickled data, which can run code when loaded; "
                             "convert it to .safetensors or pass --allow-pickle if you trust it")


def _numbered(token: str, base: str) -> bool:
    """Whether ``token`` is one of the tokens a multi-vector embedding called ``base`` adds (base_1, base_2, ...)."""
    number = token[len(base) + 1:] if token.startswith(base + "_") else ""
    return number.isdigit() and str(int(number)) == number


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
    entries = value or []
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("token"), str)
            and isinstance(e.get("sha256", ""), str) for e in entries):
        raise DataError("the record's embeddings are not a list of {path, token, sha256}: the record is damaged")
    for e in entries:
        path = Path(e["path"])
        if not path.is_file():
            raise DataError(f"the embedding {e['token']!r} this image was made with is gone: no such file {path}")
        if e.get("sha256") and file_sha256(path) != e["sha256"]:
            raise DataError(f"the embedding file {path} changed since this image was made (its sha256 differs)")
        out.append((str(path), e["token"]))
    return out


def a1111_hashes(named: list[tuple[str, str]]) -> str | None:
    """AUTOMATIC1111's `TI hashes` / `Lora hashes` value: "name: first 12 hex digits of the sha256, ...", quoted;
    None when there is none. AUTOMATIC1111 drops ':' and ',' from the names, as here."""
    if not named:
        return None
    return json.dumps(", ".join(f"{name.replace(':', '').replace(',', '')}: {digest[:12]}" for name, digest in named))


def ti_hashes(value: list[dict[str, str]] | None) -> str | None:
    """AUTOMATIC1111's `TI hashes` field, named by token."""
    return a1111_hashes([(e["token"], e["sha256"]) for e in value or []])


# 2. Loading -------------------------------------------------------------------------------------

# Trained embeddings' values are a few tenths; past this a file is broken (and float16 overflows at 65504).
VALUE_LIMIT = 1000.0


def read_vectors(path: str, allow_pickle: bool) -> dict[str, Any]:
    """An embedding file's vectors: {"": (n, width)} for one text encoder, {"clip_l", "clip_g"} for SDXL.

    Refuses, naming the file, what no text encoder can take: values that are not floating point,
    NaN, inf or past `VALUE_LIMIT`, tensors that are not one vector or a (tokens, width) matrix, and
    SDXL halves with different numbers of vectors (token T_i would mean another thing to each encoder).
    """
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
        what = f"--embedding {name}{' ' + key if key else ''}"
        if not vectors.is_floating_point():
            raise DataError(f"{what} holds {str(vectors.dtype).removeprefix('torch.')} values; an embedding's vectors "
                            "are floating-point numbers")
        vectors = vectors.detach()
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or not vectors.numel():
            raise DataError(f"{what} holds a tensor of shape {tuple(vectors.shape)}; an embedding is one vector "
                            "or a (tokens, width) matrix, width being its text encoder's hidden size")
        wide = vectors.double()
        if not torch.isfinite(wide).all():
            raise DataError(f"{what} holds NaN or infinite values")
        if wide.abs().max() > VALUE_LIMIT:
            raise DataError(f"{what} holds values as large as {float(wide.abs().max()):.3g}; trained embeddings "
                            f"stay far within ±{VALUE_LIMIT:g}")
        out[key] = vectors.float()
    if "clip_l" in out and len(out["clip_l"]) != len(out["clip_g"]):
        raise DataError(f"--embedding {name} holds {len(out['clip_l'])} clip_l vectors but {len(out['clip_g'])} "
                        "clip_g ones; an SDXL embedding needs as many for both text encoders")
    return out


def check_model_takes(embeddings: list[tuple[str, str]], class_name: str | None) -> None:
    """Refuse embeddings on a pipeline whose text encoders cannot take them (its family has no
    ``embedding_parts``: SD3, Flux, others), in one line."""
    from sdcli.families import claimed_by

    family = claimed_by(class_name)
    if not embeddings or not class_name or (family and family.embedding_parts is not None):
        return
    name = Path(embeddings[0][0]).name
    why = family.no_embeddings if family and family.no_embeddings else f"{class_name} is not one"
    raise ModelError(f"--embedding {name}: textual-inversion embeddings need a Stable Diffusion 1.x, 2.x or XL "
                     f"model; {why}")


@concerning("embeddings")
def check_embeddings_fit(embeddings: list[tuple[str, str]], allow_pickle: bool, model: str | None,
                         class_name: str | None, revision: str | None = None) -> None:
    """Before the model loads: its family takes embeddings, each file's vectors are usable, and (where the
    text encoders' configs can be read) as wide as the encoders they are for."""
    from sdcli.families import family_spec
    from sdcli.pipeline import _config

    check_model_takes(embeddings, class_name)
    if not embeddings:
        return
    folders = family_spec(class_name).embedding_parts  # a single-file model's (no class name) are SD's
    sdxl = len(folders) > 1  # SDXL's clip_l and clip_g halves
    widths = {}
    for key, folder in folders.items():
        config = _config(model, f"{folder}/config.json", revision) if model else None
        widths[key] = config.get("hidden_size") if isinstance(config, dict) else None
    for path, _token in embeddings:
        vectors = read_vectors(path, allow_pickle)
        if class_name:
            _parts(vectors, sdxl, Path(path).name)
        for key, rows in vectors.items():
            if widths.get(key) and rows.shape[1] != widths[key]:
                _refuse_width(f"{Path(path).name}{' ' + key if key else ''}", rows.shape[1], widths[key])


def _parts(vectors: dict[str, Any], sdxl: bool, name: str) -> list[str]:
    """Which of the file's vector sets go to the model's text encoders, in order; refuses a mismatch."""
    if sdxl:
        if "clip_g" not in vectors:
            raise DataError(f"--embedding {name} holds vectors for one text encoder (SD 1.x/2.x); SDXL needs "
                            "vectors for both (clip_l and clip_g)")
        return ["clip_l", "clip_g"]
    if "" not in vectors:
        raise DataError(f"--embedding {name} holds SDXL vectors (clip_l and clip_g); this model has one "
                        "text encoder")
    return [""]


def _refuse_width(what: str, width: int, expected: int) -> None:
    raise ModelError(f"--embedding {what} is {width} wide but this model's text encoder takes {expected} "
                     "(the embedding was made for another model family)")


@concerning("embeddings")
def load_embeddings(pipe: Any, embeddings: list[tuple[str, str]], allow_pickle: bool) -> None:
    """Add each embedding's token to the pipeline's tokenizer(s) and its vectors to the text encoder(s)."""
    check_model_takes(embeddings, type(pipe).__name__)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    for path, token in embeddings:
        vectors = read_vectors(path, allow_pickle)
        name = Path(path).name
        encoders = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)] if sdxl else \
            [(pipe.tokenizer, pipe.text_encoder)]
        targets = [(tok, model, vectors[part], part)
                   for (tok, model), part in zip(encoders, _parts(vectors, sdxl, name)) if model is not None]
        for tokenizer, model, rows, part in targets:  # check all before changing any
            _check_fits(tokenizer, model, rows, token, f"{name}{' ' + part if part else ''}")
        for tokenizer, model, rows, _part in targets:
            _add_token(tokenizer, model, rows, token)


def _names(token: str, n: int) -> list[str]:
    """The tokens of an n-vector embedding: T, T_1, ..., T_{n-1} (diffusers' naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def _check_fits(tokenizer: Any, model: Any, rows: Any, token: str, what: str) -> None:
    width = model.get_input_embeddings().weight.shape[1]
    if rows.shape[1] != width:
        _refuse_width(what, rows.shape[1], width)
    vocab = tokenizer.get_vocab()
    if len(tokenizer.tokenize(token)) == 1 or token in vocab:
        raise UsageError(f"--embedding: the token {token!r} is already in this model's vocabulary; give the "
                         "embedding another name with PATH:TOKEN")
    taken = [n for n in _names(token, len(rows))[1:] if n in vocab]
    if taken:  # its row would be overwritten: another word (or embedding) would change meaning
        raise UsageError(f"--embedding {what}: its {len(rows)} vectors take the tokens {token}, {token}_1, ..., "
                         f"and {taken[0]!r} is already in this model's vocabulary; name it another way with "
                         "PATH:TOKEN")
    limit = min(tokenizer.model_max_length or 77, model.config.max_position_embeddings) - 2
    if len(rows) > limit:
        raise ModelError(f"--embedding {what} has {len(rows)} vectors, more than a prompt chunk holds ({limit})")


def _add_token(tokenizer: Any, model: Any, rows: Any, token: str) -> None:
    import torch

    names = _names(token, len(rows))
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    rows_now = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(max(len(tokenizer), rows_now), mean_resizing=False)
    table = model.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = rows.to(table.dtype).to(table.device)

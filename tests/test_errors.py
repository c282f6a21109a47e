"""The one table of foreign exceptions: matched by type (nearest entry in the MRO), never by class name."""

from __future__ import annotations

import errno
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import errors as hub
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError

from conftest import one_error_line
from sdcli.errors import DataError, ModelError, OutputError, SdcliError, classify, classify_chain, friendly


def http_error(cls, message):
    """A huggingface_hub HTTP error without a real HTTP response."""
    return cls(message, response=SimpleNamespace(headers={}, request=None, status_code=404, url="https://hf.co/x"))


def raised(exc, cause=None, context=None):
    """``exc`` as Python leaves it when raised ``from cause`` or while handling ``context``."""
    exc.__cause__, exc.__context__ = cause, context
    return exc


@pytest.mark.parametrize("exc,kind,error,words", [
    (SafetensorError("Error while deserializing header: invalid header length"), "corrupt-weights", ModelError,
     "corrupt or unreadable weights file: Error while deserializing header"),
    (http_error(hub.RepositoryNotFoundError, "Repository Not Found for url: x\ndetails"), "not-found", ModelError,
     "Repository Not Found for url: x"),
    # Subclasses of entries with their own meaning: the nearest entry in the MRO wins.
    (http_error(hub.GatedRepoError, "Access to model x is restricted."), "gated", ModelError, "restricted"),
    (hub.LocalEntryNotFoundError("not in the cache"), "not-cached", ModelError, "not available offline"),
    (hub.OfflineModeIsEnabled("offline mode is enabled"), "offline", ModelError, "not available offline"),
    (hub.HFValidationError("Repo id must use alphanumeric chars"), "not-found", ModelError, "Repo id must"),
    (http_error(hub.RevisionNotFoundError, "Invalid rev id: nope"), "no-revision", ModelError, "Invalid rev id"),
    (hub.EntryNotFoundError("no vae/config.json"), "no-file", ModelError, "no vae/config.json"),
    (UnidentifiedImageError("cannot identify image file 'x.jpg'"), "bad-image", DataError, "not a readable image"),
    (Image.DecompressionBombError("Image size (400000000 pixels) exceeds limit"), "image-bomb", DataError,
     "400000000 pixels"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/out"), "permission", OutputError,
     "permission denied: /root/out"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "prompts.txt"), "missing", SdcliError,
     "No such file or directory: prompts.txt"),
    (OSError(errno.ENOSPC, "No space left on device"), "disk-full", OutputError, "no space left on device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/home/me/out"), "disk-full", OutputError,
     "disk quota exceeded: /home/me/out"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/cd/out"), "read-only", OutputError,
     "read-only file system: /mnt/cd/out"),
    (OSError(errno.ENAMETOOLONG, "File name too long", "/tmp/" + "x" * 300), "name-too-long", OutputError,
     "file name too long: /tmp/xxx"),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "unreachable", SdcliError, "cannot reach"),
])
def test_each_type_has_one_meaning(exc, kind, error, words):
    known = classify(exc)
    assert known is not None and known.kind == kind and known.error is error
    assert words in known.message and "\n" not in known.message
    assert type(friendly(exc)) is error and str(friendly(exc)) == known.message


def test_types_not_names_decide():
    class RepositoryNotFoundError(Exception):  # the same name, not the same type
        pass

    class MirrorMissing(hub.RepositoryNotFoundError):  # another name, the same type
        pass

    assert classify(RepositoryNotFoundError("x")) is None
    assert classify(http_error(MirrorMissing, "gone")).kind == "not-found"


@pytest.mark.parametrize("exc", [
    BrokenPipeError(errno.EPIPE, "Broken pipe"),  # a ConnectionError, but stdout piped to `head`, not the network
    OSError(errno.EIO, "Input/output error"),  # OSError is in the table for ENOSPC only
    ValueError("a bug"),
    RuntimeError("another"),
])
def test_what_the_table_does_not_know_keeps_its_traceback(exc):
    assert classify(exc) is None and friendly(exc) is None


def test_friendly_looks_at_the_exception_itself_not_what_it_was_handling():
    bug = raised(RuntimeError("a bug in the handler"), context=FileNotFoundError(errno.ENOENT, "gone", "x"))
    assert friendly(bug) is None
    assert [k.kind for k in classify_chain(bug)] == ["missing"]


def test_chain_finds_what_diffusers_rewrapped():
    import httpx2

    offline = hub.OfflineModeIsEnabled("offline mode is enabled")
    cached = raised(hub.LocalEntryNotFoundError("not cached"), cause=offline)
    outer = raised(OSError("x does not appear to have a file named scheduler_config.json."), context=cached)
    assert [k.kind for k in classify_chain(outer)] == ["not-cached", "offline"]
    assert classify_chain(outer)[1].exc is offline
    unreachable = raised(OSError("no file"), cause=raised(hub.LocalEntryNotFoundError("not cached"),
                                                          cause=httpx2.ConnectError("Name or service not known")))
    assert [k.kind for k in classify_chain(unreachable)] == ["not-cached", "unreachable"]


def test_scheduler_config_messages_come_from_the_chain(monkeypatch):
    import httpx2
    from huggingface_hub import constants

    from sdcli.schedule.core import _hub_message

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    offline = raised(OSError("no file"), cause=hub.OfflineModeIsEnabled("offline"))
    assert "HF_HUB_OFFLINE is set" in _hub_message("a/b", offline)
    down = raised(OSError("no file"), cause=raised(hub.LocalEntryNotFoundError("not cached"),
                                                   cause=httpx2.ConnectTimeout("timed out")))
    assert _hub_message("a/b", down) == "cannot reach the Hugging Face Hub to read 'a/b''s scheduler config"
    missing = raised(OSError("no file"), cause=http_error(hub.RepositoryNotFoundError, "404"))
    assert _hub_message("a/b", missing) == "model 'a/b' not found locally or on the Hugging Face Hub"
    assert _hub_message("a/b", ValueError("odd\nmore")) == "cannot read the scheduler config of 'a/b': odd"


def test_pipeline_load_messages_come_from_the_chain():
    from sdcli.pipeline import _load_message

    def wrapped(cause):
        return raised(OSError("Error no file named diffusion_pytorch_model.bin found"), cause=cause)

    assert _load_message("a/b", wrapped(http_error(hub.RepositoryNotFoundError, "404"))) == \
        "model 'a/b' not found locally or on the Hugging Face Hub"
    assert "is gated" in _load_message("a/b", wrapped(http_error(hub.GatedRepoError, "403")))
    assert "not found in the local Hugging Face cache" in _load_message("a/b", wrapped(hub.OfflineModeIsEnabled("x")))
    assert _load_message("m", wrapped(SafetensorError("bad"))).startswith("corrupt weights in m:")
    assert _load_message("m", ValueError("something else")) == "cannot load m: something else"


# Errors name the setting; each front-end words it -------------------------------------------------------


def _api_names():
    """A front-end's names for every generate setting: its own (snake_case) ones, guidance as `cfg_scale`."""
    from sdcli.declare import declared
    from sdcli.generation.settings import Settings

    return {d.name: d.name for d in declared(Settings)} | {"guidance": "cfg_scale"}


def test_worded_replaces_whole_flags_long_and_short_and_keeps_the_rest():
    from sdcli.declare import worded
    from sdcli.errors import UsageError
    from sdcli.generation.settings import Settings

    exc = UsageError("--guidance 3 (-g) with --guidance-rescale 2 and --steps 4, not --from-metadata",
                     setting="guidance")
    assert worded(exc, {"guidance": "cfg_scale"}, Settings) == ("cfg_scale 3 (cfg_scale) with --guidance-rescale 2 "
                                                               "and --steps 4, not --from-metadata")
    assert worded(exc, {}, Settings) == str(exc)
    import pickle

    assert pickle.loads(pickle.dumps(exc)).setting == "guidance"  # an error from a worker process keeps it


def _flux(tmp_path_factory):
    from sdcli.testing import save_tiny_pipeline

    return str(save_tiny_pipeline(tmp_path_factory.mktemp("flux") / "flux", "flux"))


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return _flux(tmp_path_factory)


# (the model, command-line arguments, the setting the refusal is about): declared ranges, parsing, combinations,
# a task's setting without its task, guidance, a family's rules; all before any weights load.
ABOUT = [
    ("sd", ["-g", "1001"], "guidance"),
    ("sd", ["-g", "3,abc"], "guidance"),
    ("sd", ["--steps", "0"], "steps"),
    ("sd", ["-W", "20"], "width"),
    ("sd", ["--seed", "1,2", "--num-images", "2"], "num_images"),
    ("sd", ["--seed", str(2**63 - 2), "--num-images", "3"], "seeds"),
    ("sd", ["--strength", "0.5"], "strength"),
    ("sd", ["--init-image", "INIT", "--strength", "0.1", "--steps", "4"], "strength"),
    ("sd", ["--init-image", "missing.png"], "init_image"),
    ("sd", ["--mask", "INIT"], "mask"),
    ("sd", ["--init-image", "INIT", "--mask", "BLACK"], "mask"),
    ("sd", ["--init-image", "INIT", "--outpaint", "4,0,0,0"], "outpaint"),
    ("sd", ["--hires-scale", "2", "--init-image", "INIT"], "hires_scale"),
    ("sd", ["--control-start", "0.5"], "control_start"),
    ("sd", ["-n", "blurry", "-g", "1"], "negative_prompt"),
    ("sd", ["--init-image", "INIT", "--guidance-rescale", "0.5"], "guidance_rescale"),
    ("sd", ["--clip-skip", "2", "--prompt-syntax", "plain"], "clip_skip"),
    ("sd", ["--embedding", "missing.pt"], "embeddings"),
    ("sd", ["--lora", "BAD"], "loras"),
    ("sd", ["-s", "ddim", "--sigmas", "karras"], "sigmas"),
    ("flux", ["--clip-skip", "2"], "clip_skip"),
    ("flux", ["-s", "ddim"], "scheduler"),
    ("flux", ["--prompt-syntax", "a1111", "--", "a (red:1.3) circle"], "prompt_syntax"),
    ("flux", ["-g", "3"], "guidance"),
    ("flux", ["--", "a [red:blue:0.5] circle"], "prompts"),
]


@pytest.mark.parametrize("model,args,setting", ABOUT, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_refusal_names_its_setting_the_cli_words_it_as_before_and_an_api_words_it_its_way(
        cli, tiny_sd, tiny_flux, monkeypatch, tmp_path, model, args, setting):
    from sdcli.declare import flags_of
    from sdcli.declare import worded
    from sdcli.generation.settings import Settings

    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "init.png")
    Image.new("L", (16, 16), 0).save(tmp_path / "black.png")
    (tmp_path / "bad.safetensors").write_bytes(b"not weights")
    args = [{"INIT": "init.png", "BLACK": "black.png", "BAD": "bad.safetensors"}.get(a, a) for a in args]
    prompt = [] if "--" in args else ["a red circle"]
    argv = ["generate", *prompt, "--model", tiny_flux if model == "flux" else tiny_sd, "--out", "o.png", *args]
    monkeypatch.setenv("SDCLI_DEBUG", "1")  # the exception itself, not the line it becomes
    exc = cli(*argv).exception
    monkeypatch.delenv("SDCLI_DEBUG")
    assert isinstance(exc, SdcliError) and exc.setting == setting, (type(exc), exc, getattr(exc, "setting", None))
    assert one_error_line(cli(*argv)) == f"error: {exc}"  # the CLI's line: the library's text, flags and all
    flags = flags_of(Settings)
    assert any(flag in str(exc) for flag in flags[setting]) or not flags[setting]  # the prompts have no flag
    api = worded(exc, _api_names(), Settings)
    assert _api_names()[setting] in api
    left = [f for fs in flags.values() for f in fs if re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", api)]
    assert not left, api  # no command-line flag left for a setting the front-end names
    assert not Path("o.png").exists()


def test_every_setting_an_error_names_is_a_declared_one():
    from sdcli.declare import declared
    from sdcli.generation.settings import Settings

    import sdcli

    names = {d.name for d in declared(Settings)}
    root = Path(sdcli.__file__).parent
    found = {m for path in root.rglob("*.py") for m in re.findall(r'setting="(\w+)"', path.read_text())}
    assert found and found <= names, found - names

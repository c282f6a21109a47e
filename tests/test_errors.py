"""The one table of foreign exceptions: matched by type (nearest entry in the MRO), never by class name."""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest
from huggingface_hub import errors as hub
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError

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

"""One error family for what the user did wrong, turned into one line by the CLI.

Commands and library functions raise `SdcliError` (or a subclass) with a
message that names the bad value. `sdcli.cli` prints it as one red line on
stderr and exits 1 (2 for `UsageError`); `SDCLI_DEBUG=1` shows the traceback.
Errors from the libraries underneath that are really the user's doing (a
missing file, a corrupt checkpoint) are recognised by type in one table (`_table`,
as huggingface_hub's CLI does) and translated by `friendly()`; code that words
them for its own context (`sdcli.pipeline`, `sdcli.schedule`) asks `classify_chain`.

An error about one setting says which (`SdcliError.setting`, the declared field's name) and words it as
the command line does (`--guidance`); another front-end rewords it with `worded` (`cfg_scale`).
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass


class SdcliError(Exception):
    """Something the user can fix; the message says what.

    ``setting`` is the declared setting the message is about (the field's name, "guidance"), None when it is
    about no single one. The message names it as the command line does (--guidance); `worded` rewords it for
    another front-end from the declarations, so library code raises one text for all of them.
    """

    exit_code = 1

    def __init__(self, *args: object, setting: str | None = None):
        super().__init__(*args)
        self.setting = setting  # in __dict__, so a pickled error (a worker process's) keeps it


def about(exc: SdcliError, setting: str) -> SdcliError:
    """``exc`` marked as about ``setting``, unless something nearer the cause already said which; for
    code that knows the setting a helper it called was checking (a declared parser, a record reader)."""
    if exc.setting is None:
        exc.setting = setting
    return exc


def concerning(setting: str):
    """Decorate a check whose every error is about ``setting`` (`about`): a helper deep inside it need not
    know which setting its file or value came from."""
    import functools

    def decorate(check):
        @functools.wraps(check)
        def checked(*args, **kwargs):
            try:
                return check(*args, **kwargs)
            except SdcliError as exc:
                raise about(exc, setting)

        return checked

    return decorate


class UsageError(SdcliError):
    """A bad option value or a combination of options that cannot work."""

    exit_code = 2


class ModelError(SdcliError):
    """A model that cannot be found, read or used as asked."""


class DataError(SdcliError):
    """Input data (images, captions, prompt files) that cannot be used."""


class OutputError(SdcliError):
    """An output that cannot be written, or would overwrite something."""


class ResourceError(SdcliError):
    """A valid request this machine cannot hold now (more memory than is free): exit 1, not 2, since
    the command line is not wrong and the same command may run elsewhere (`sdcli.memory`)."""


def debug_enabled() -> bool:
    return os.environ.get("SDCLI_DEBUG", "").strip() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class Known:
    """A foreign exception the table recognises: what kind of failure, and how to say it in one line."""

    kind: str  # "corrupt-weights", "not-found", "offline", "unreachable", "bad-image", ...: for callers' own wording
    error: type[SdcliError]
    message: str
    exc: BaseException  # the exception that matched (a cause, when found through classify_chain)


_OFFLINE = "not available offline (HF_HUB_OFFLINE is set or the Hub is unreachable): {text}"
_NETWORK = "cannot reach the network: {text}"


def _table() -> dict[type, tuple[str, type[SdcliError], str]]:
    """Exception type -> (kind, error class, message template); the one place a foreign error gets a meaning.

    Imported here, not at module level, so `sdcli --help` stays instant. A subclass needs its own
    entry only to mean something else than its base: `classify` takes the nearest entry in the MRO.
    """
    from huggingface_hub import errors as hub
    from PIL import Image, UnidentifiedImageError
    from safetensors import SafetensorError

    table: dict[type, tuple[str, type[SdcliError], str]] = {
        SafetensorError: ("corrupt-weights", ModelError, "corrupt or unreadable weights file: {text}"),
        hub.RepositoryNotFoundError: ("not-found", ModelError, "{text}"),
        hub.HFValidationError: ("not-found", ModelError, "{text}"),  # not a Hub id, so no such model there
        hub.GatedRepoError: ("gated", ModelError, "{text}"),
        hub.RevisionNotFoundError: ("no-revision", ModelError, "{text}"),
        hub.EntryNotFoundError: ("no-file", ModelError, "{text}"),
        hub.LocalEntryNotFoundError: ("not-cached", ModelError, _OFFLINE),
        hub.OfflineModeIsEnabled: ("offline", ModelError, _OFFLINE),
        UnidentifiedImageError: ("bad-image", DataError, "not a readable image: {text}"),
        Image.DecompressionBombError: ("image-bomb", DataError, "refused as a decompression bomb: {text}"),
        PermissionError: ("permission", OutputError, "permission denied: {file}"),
        FileNotFoundError: ("missing", SdcliError, "{strerror}: {file}"),
        IsADirectoryError: ("missing", SdcliError, "{strerror}: {file}"),
        NotADirectoryError: ("missing", SdcliError, "{strerror}: {file}"),
        # Not ConnectionError itself: BrokenPipeError (stdout piped to `head`) is one too.
        ConnectionRefusedError: ("unreachable", SdcliError, _NETWORK),
        ConnectionResetError: ("unreachable", SdcliError, _NETWORK),
        TimeoutError: ("unreachable", SdcliError, _NETWORK),
        OSError: ("disk", OutputError, ""),  # only the errnos in _DISK: see _match
    }
    # HTTP clients differ by huggingface_hub version and may be absent; one not yet imported raised nothing.
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        for name in names:
            cls = getattr(sys.modules.get(module), name, None)
            if isinstance(cls, type):
                table[cls] = ("unreachable", SdcliError, _NETWORK)
    return table


# A plain OSError means "bad input" only for what a disk or a path says about where output goes.
_DISK = {
    errno.ENOSPC: ("disk-full", "no space left on device"),
    errno.EDQUOT: ("disk-full", "disk quota exceeded"),
    errno.EROFS: ("read-only", "read-only file system"),
    errno.ENAMETOOLONG: ("name-too-long", "file name too long"),
}


def _match(exc: BaseException, table: dict) -> Known | None:
    for cls in type(exc).__mro__:
        entry = table.get(cls)
        if entry is None or (cls is OSError and getattr(exc, "errno", None) not in _DISK):
            continue
        kind, error, template = entry
        if cls is OSError:
            kind, what = _DISK[exc.errno]
            filename = getattr(exc, "filename", None)
            return Known(kind, error, f"{what}: {filename}" if filename else what, exc)
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].strip()
        message = template.format(text=text, file=getattr(exc, "filename", None) or text,
                                  strerror=getattr(exc, "strerror", None) or "not found")
        return Known(kind, error, message, exc)
    return None


def classify(exc: BaseException) -> Known | None:
    """What the table says about ``exc`` itself (by type, the nearest entry in its MRO), else None."""
    return _match(exc, _table())


def classify_chain(exc: BaseException) -> list[Known]:
    """``classify`` for ``exc`` and each exception it was raised from or while handling, outermost first.

    diffusers rewraps Hub failures as a plain OSError ("does not appear to have a file named ..."):
    only the chain says whether the Hub was offline, unreachable, or had no such model.
    """
    table, found, seen = _table(), [], set()
    while exc is not None and id(exc) not in seen and len(seen) < 20:
        seen.add(id(exc))
        known = _match(exc, table)
        if known is not None:
            found.append(known)
        exc = exc.__cause__ or exc.__context__
    return found


def friendly(exc: BaseException) -> SdcliError | None:
    """Translate a foreign exception that means "bad input" into an SdcliError, else None.

    Only ``exc`` itself is classified, not its causes: a bug raised while handling a missing
    file is still a bug, and keeps its traceback.
    """
    if isinstance(exc, SdcliError):
        return exc
    known = classify(exc)
    return known.error(known.message) if known else None

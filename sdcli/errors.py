"""One error family for what the user did wrong, turned into one line by the CLI.

Commands and library functions raise `SdcliError` (or a subclass) with a
message that names the bad value. `sdcli.cli` prints it as one red line on
stderr and exits 1 (2 for `UsageError`); `SDCLI_DEBUG=1` shows the traceback.
Errors from the libraries underneath that are really the user's doing (a
missing file, a corrupt checkpoint) are translated by `friendly()`.
"""

from __future__ import annotations

import os


class SdcliError(Exception):
    """Something the user can fix; the message says what."""

    exit_code = 1


class UsageError(SdcliError):
    """A bad option value or a combination of options that cannot work."""

    exit_code = 2


class ModelError(SdcliError):
    """A model that cannot be found, read or used as asked."""


class DataError(SdcliError):
    """Input data (images, captions, prompt files) that cannot be used."""


class OutputError(SdcliError):
    """An output that cannot be written, or would overwrite something."""


def debug_enabled() -> bool:
    return os.environ.get("SDCLI_DEBUG", "").strip() not in ("", "0", "false", "no")


def friendly(exc: BaseException) -> SdcliError | None:
    """Translate a foreign exception that means "bad input" into an SdcliError, else None."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    if isinstance(exc, SdcliError):
        return exc
    if name in ("SafetensorError", "HeaderTooLarge", "HeaderTooSmall", "InvalidHeaderDeserialization"):
        return ModelError(f"corrupt or unreadable weights file: {text}")
    if name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "EntryNotFoundError"):
        return ModelError(text)
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return ModelError(f"not available offline (HF_HUB_OFFLINE is set or the Hub is unreachable): {text}")
    if name == "UnidentifiedImageError":
        return DataError(f"not a readable image: {text}")
    if isinstance(exc, PermissionError):
        return OutputError(f"permission denied: {exc.filename or text}")
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return SdcliError(f"{exc.strerror or 'not found'}: {exc.filename or text}")
    if isinstance(exc, OSError) and exc.errno == 28:
        return OutputError("no space left on device")
    return None

"""Errors fmhub reports to users.

Every message is one line that says what went wrong and what to do about it;
the CLI and the git filter print it as is.
"""


class FmhubError(Exception):
    """Base class: a problem the user can act on."""


class CorruptCheckpoint(FmhubError):
    """A checkpoint file does not match its own header (truncated, bad offsets, not a checkpoint)."""


class UnreadableRows(FmhubError):
    """A data file (jsonl, parquet) whose rows cannot be read; its bytes are still stored and checked out exactly."""


class ManifestError(FmhubError):
    """A manifest that cannot be parsed or does not match its objects."""


class MissingObject(FmhubError):
    """An object a manifest names is not in the store."""


class MissingPackBase(MissingObject, KeyError):
    """A packed object (`fmhub repack`) whose base, or an object further down its chain, is not in the store.

    Also a KeyError, which is how `ObjectStore.open_object` says "not here", so
    callers that catch that report the object as missing, as they should.
    """

    __str__ = Exception.__str__  # KeyError's own would quote the message


class CorruptObject(FmhubError):
    """An object whose bytes do not hash to its name."""


class StoreWriteError(FmhubError):
    """The object store could not be written (a full disk, a file size limit, permissions)."""


class MergeConflict(FmhubError):
    """Tensors changed differently on both sides of a merge, with no strategy to combine them."""

    def __init__(self, message: str = "", conflicts: int = 1) -> None:
        super().__init__(message)
        self.conflicts = conflicts  # how many tensors could not be merged (the audit log records it)


class PluginError(FmhubError):
    """A plugin is missing or broke its hook contract."""


class TransferError(FmhubError):
    """An object could not be sent to or fetched from an LFS server."""


class RemoteAuthError(TransferError):
    """The LFS server refused our credentials (HTTP 401/403)."""


class RemoteUnavailable(TransferError):
    """The LFS server could not be reached, or kept failing after retries."""


class CorruptDownload(TransferError, CorruptObject):
    """A server sent bytes that do not hash to the object asked for; they were discarded."""


class RemoteMissingObject(TransferError, MissingObject):
    """The LFS server does not have an object asked for (a push that left it behind)."""


class ServeError(FmhubError):
    """A request a server refuses: an HTTP status, an OpenAI error type and a message for the client."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


_UNPRINTABLE: dict = {}  # compiled on first use: git's filter imports this module on every git command


def printable(text: str, tabs: bool = False) -> str:
    """``text`` safe to show on a terminal: control characters, line separators and bidi marks escaped
    (``\\n``, ``\\x1b``, ``\\u202e``), tabs too unless ``tabs`` keeps them.

    Messages quote paths, tensor names, keys and fields from repositories and servers: shown raw, a path holding
    a newline could print a second line that looks like fmhub's own (``fmhub: … verified``), and an escape
    sequence could move the cursor, recolour or hide other output.
    """
    if tabs not in _UNPRINTABLE:
        import re

        controls = "\x00-\x08\x0a-\x1f" if tabs else "\x00-\x1f"
        _UNPRINTABLE[tabs] = re.compile(f"[{controls}\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")
    return _UNPRINTABLE[tabs].sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def one_line(message: str) -> str:
    """``message`` as one printable line (`printable`, tabs kept): what every command prints after ``fmhub:``."""
    return printable(message, tabs=True)


def unexpected(doing: str, exc: BaseException) -> str:
    """One line for an error no check anticipated: what failed and why, never a traceback (FMHUB_DEBUG=1 shows it)."""
    detail = str(exc).splitlines()[0][:200] if str(exc).strip() else ""
    return f"{doing} failed unexpectedly ({type(exc).__name__}{': ' + detail if detail else ''}); set FMHUB_DEBUG=1 to see where"

"""The files of an object store: the helpers its reading, writing and packing parts share.

Objects are named by the sha256 of their bytes (`is_oid`) and laid out as
``OID[0:2]/OID[2:4]/OID`` (`iter_named`); files are written whole with
`write_all`, temp files are dropped quietly, and an ``OSError`` becomes a
one-line `StoreWriteError` (`as_user_error`). Knows nothing of `fmhub.core.store.ObjectStore`.
"""

from __future__ import annotations

import os

from fmhub.base.errors import StoreWriteError

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import Iterator

CHUNK = 1 << 20  # bytes per read when hashing or copying an object


def is_oid(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


class BytesReader:
    """``read(n)`` over a buffer without copying it whole (io.BytesIO would)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self._view, self._at = memoryview(data), 0

    def read(self, n: int) -> memoryview:
        part = self._view[self._at : self._at + n]
        self._at += len(part)
        return part


def iter_named(root: str) -> Iterator[str]:
    """The object files under ``root`` laid out as OID[0:2]/OID[2:4]/OID."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if len(name) == 64 and dirpath.endswith(os.path.join(name[0:2], name[2:4])):
                yield name


def write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def drop_temp(owner) -> None:
    """Close and remove an unfinished object's temp file (``owner._fd``, ``owner._tmp``), once."""
    if owner._fd is not None:
        os.close(owner._fd)
        owner._fd = None
    if owner._tmp is not None:
        unlink_quiet(owner._tmp)
        owner._tmp = None


def unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def as_user_error(exc: BaseException, where: str) -> BaseException:
    if isinstance(exc, OSError):
        import errno

        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return StoreWriteError(f"cannot write to the object store {where}: {exc.strerror}; free some space and run the command again")
        return StoreWriteError(f"cannot write to the object store {where}: {exc}")
    return exc

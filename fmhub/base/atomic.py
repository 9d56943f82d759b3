"""Writing a file so that readers see the old version or the whole new one, never a part."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", prefix: str = ".fmhub-", chmod: int | None = None) -> Iterator[IO]:
    """Yield a temp file beside ``path``; on success fsync it and rename it over ``path``, on error remove it.

    The temp file is in the same directory, so the rename is atomic; a crash
    leaves at most a ``{prefix}*.tmp`` file, never a half-written ``path``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, chmod if chmod is not None else _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_tree(path: str) -> None:
    """fsync every file directly in ``path`` (a finished model or adapter directory), before it is renamed into place."""
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            os.fsync(f.fileno())


def replace_dir(tmp: str, output_dir: str) -> None:
    """Put the finished ``tmp`` at ``output_dir``; an old directory there is moved aside first, then removed."""
    import shutil

    old = None
    if os.path.exists(output_dir):
        old = tempfile.mkdtemp(dir=os.path.dirname(tmp), prefix=".fmhub-old-")
        os.rmdir(old)
        os.rename(output_dir, old)
    os.rename(tmp, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _mode_for(path: str) -> int:
    """The mode ``path`` has, or the one ``open()`` would give a new file (mkstemp's 0600 is not what users expect)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask

"""The file formats installed: checkpoint formats (the ``format`` hook) and data formats (``data-format``),
and telling which one a file is in from its first `SNIFF_BYTES` bytes.

Shared by clean and smudge of checkpoints (`fmhub.core.checkpoint`) and of data files
(`fmhub.core.datafile`), and by the readers above them.
"""

from __future__ import annotations

from fmhub.plugin import host

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from fmhub.plugin.interfaces import CheckpointFormat, DataFormat

SNIFF_BYTES = 16


def checkpoint_formats() -> list[CheckpointFormat]:
    return list(host.registry("format").values())


def format_named(name: str) -> CheckpointFormat:
    return host.lookup("format", name)


def sniff_format(head: bytes) -> CheckpointFormat | None:
    for fmt in checkpoint_formats():
        if fmt.sniff(head):
            return fmt
    return None


def diagnose(head: bytes) -> str:
    """Why no format claims a file starting with ``head``: a format's own reason (its header over a limit), or ''."""
    for fmt in checkpoint_formats():
        why = getattr(fmt, "diagnose", lambda _head: None)(head)
        if why:
            return why
    return ""


# -- data files


def data_formats() -> list[DataFormat]:
    return list(host.registry("data-format").values())


def data_format_named(name: str) -> DataFormat:
    return host.lookup("data-format", name)


def data_format_for(path: str, head: bytes) -> DataFormat | None:
    """The data format for a file: the first that recognises ``head``, else the first claiming the path's ending."""
    formats = data_formats()
    for fmt in formats:
        if fmt.sniff(head):
            return fmt
    lower = path.lower()
    for fmt in formats:
        if lower.endswith(tuple(e.lower() for e in fmt.extensions)):
            return fmt
    return None

"""The plain records fmhub and its plugins exchange: a checkpoint's layout, a cleaning verdict, the contexts of
pipelines, an access request and its decision.

Part of the plugin interface (`fmhub.interfaces` re-exports every one of them,
beside the Protocols that say what plugins provide). Kept apart from those
because git's filter builds some of these for every file it cleans, and this
module needs no more than ``dataclasses`` (``typing`` costs the filter ~9 ms).
"""

from __future__ import annotations

from dataclasses import dataclass, field

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint file as its header describes it.

    ``size`` is the number of payload bytes the tensor occupies in the file.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    size: int


@dataclass(frozen=True)
class Layout:
    """How a checkpoint file splits into a header and tensor payloads.

    The file is exactly ``header`` followed by each tensor's payload, in the
    order of ``tensors``, with nothing in between and nothing after. A format
    plugin must refuse a file that does not fit this shape (gaps, overlaps,
    trailing bytes) rather than describe it approximately: fmhub rebuilds files
    byte for byte from this description.
    """

    header: bytes
    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, str] | None = None
    data_size: int = field(default=0)


@dataclass(frozen=True)
class Drop:
    """A cleaning step's verdict on one row: leave it out of the output.

    ``reason`` is one line for a reviewer ("4 words < min_words 5"); it is
    shown in reports, so it must never quote sensitive text. ``detail`` is
    optional plain JSON data for tools (``{"duplicate_of": 12, "jaccard":
    0.91}``). ``shown`` is an optional stand-in for the row in reports (a
    redacted copy), for a step that drops rows because of what they contain.
    """

    reason: str
    detail: Mapping[str, Any] | None = None
    shown: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Edit:
    """A cleaning step's verdict on one row: keep it, changed to ``row`` (a new dict; never change rows in place).

    ``reason`` says what changed without quoting what was removed ("redacted
    2 email"); fmhub records which columns differ.
    """

    row: Mapping[str, Any]
    reason: str
    detail: Mapping[str, Any] | None = None


Verdict = Drop | Edit | None
"""What a step returns per row: ``None`` keeps the row as it is, `Drop` leaves it out, `Edit` replaces it."""


@dataclass(frozen=True)
class CleanContext:
    """What a cleaning pipeline tells each cleaner it configures.

    ``columns`` are the text columns the step looks at: the step's
    ``columns:`` option, else the pipeline's, else the dataset's text column.
    ``base_dir`` is the directory of ``fmhub.yaml``, against which relative
    paths in options are resolved.
    """

    columns: tuple[str, ...] = ("text",)
    base_dir: str = "."


@dataclass(frozen=True)
class LabelContext:
    """What a labelling pipeline tells each labeler it configures (plain data: it travels to worker processes).

    ``classes`` are the pipeline's class names, in order; ``column`` its text
    column (a labeler's own ``column:`` option overrides it); ``base_dir`` the
    directory of ``fmhub.yaml``, against which relative paths in options are
    resolved.
    """

    classes: tuple[str, ...]
    column: str = "text"
    base_dir: str = "."


@dataclass(frozen=True)
class AccessRequest:
    """One access to decide: may ``principal`` do ``action`` (``read``/``write``) on this?

    ``principal`` is the user (``FMHUB_USER``, ``git config user.email``, or
    the user a server token maps to; ``None``: unknown). ``repo`` names the
    repository (its work tree locally, its name on a server); ``path`` is the
    file in it. ``tensor`` names one tensor of a checkpoint, ``column`` one
    column of a dataset; both ``None`` means the whole file (every tensor and
    column in it). ``oid`` is the object asked for, when there is one (server
    downloads). ``read_file(path)`` returns a file of the repository at the
    revision that governs (the work tree locally, the default branch on a
    server) as bytes, or ``None``: policies read their configuration through
    it, never from the current directory.
    """

    principal: str | None
    action: str
    repo: str
    path: str | None
    tensor: str | None = None
    column: str | None = None
    oid: str | None = None
    read_file: Callable[[str], "bytes | None"] = field(default=lambda _path: None, compare=False, repr=False)


@dataclass(frozen=True)
class Decision:
    """A policy's answer: ``allowed``; for a deny, a one-line ``reason`` safe to show the requester.

    ``reason`` must not quote restricted content (tensor values, rows) nor
    name other users; ``roles`` are the roles that would allow the request
    (what the user should ask for). ``placeholder`` asks smudge to write the
    manifest text instead of failing. ``where`` is the rule's ``file:line``.
    """

    allowed: bool
    reason: str = ""
    roles: tuple[str, ...] = ()
    placeholder: bool = False
    where: str = ""
    policy: str = ""

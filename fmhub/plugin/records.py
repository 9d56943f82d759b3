"""The plain records git's filter exchanges with plugins: a checkpoint's layout, an access request and its decision.

Part of the plugin interface (`fmhub.plugin.interfaces` re-exports them, beside the
Protocols that say what plugins provide). Kept apart, as named tuples, because
git's filter builds them for every file it cleans: this module needs neither
``typing`` nor ``dataclasses``, and a named tuple costs a tenth of a dataclass
to define (the filter's start-up is the point: about git-lfs's whole time).
"""

from __future__ import annotations

from collections import namedtuple


class TensorInfo(namedtuple("TensorInfo", "name dtype shape size")):
    """One tensor of a checkpoint file as its header describes it.

    ``size`` is the number of payload bytes the tensor occupies in the file.
    """

    __slots__ = ()


class Layout(namedtuple("Layout", "header tensors metadata data_size", defaults=(None, 0))):
    """How a checkpoint file splits into a header and tensor payloads.

    The file is exactly ``header`` followed by each tensor's payload, in the
    order of ``tensors``, with nothing in between and nothing after. A format
    plugin must refuse a file that does not fit this shape (gaps, overlaps,
    trailing bytes) rather than describe it approximately: fmhub rebuilds files
    byte for byte from this description.
    """

    __slots__ = ()


class AccessRequest(namedtuple("AccessRequest", "principal action repo path tensor column oid read_file",
                               defaults=(None, None, None, lambda _path: None))):
    """One access to decide: may ``principal`` do ``action`` (``read``/``write``) on this?

    ``principal`` is the user (``FMHUB_USER``, ``git config user.email``, or
    the user a server token maps to; ``None``: unknown). ``repo`` names the
    repository (its work tree locally, its name on a server); ``path`` is the
    file in it. ``tensor`` names one tensor of a checkpoint, ``column`` one
    column of a dataset; both ``None`` means the whole file (every tensor and
    column in it). ``oid`` is the object asked for, when there is one (server
    downloads). ``read_file(path)`` returns a file of the repository at the
    revision that governs (the work tree locally; on ``fmhub server`` the tip
    of the protected branch that names the object, `fmhub.server.guard`) as
    bytes, or ``None``: policies read their configuration through it, never
    from the current directory.
    """

    __slots__ = ()


class Decision(namedtuple("Decision", "allowed reason roles placeholder where policy", defaults=("", (), False, "", ""))):
    """A policy's answer: ``allowed``; for a deny, a one-line ``reason`` safe to show the requester.

    ``reason`` must not quote restricted content (tensor values, rows) nor
    name other users; ``roles`` are the roles that would allow the request
    (what the user should ask for). ``placeholder`` asks smudge to write the
    manifest text instead of failing. ``where`` is the rule's ``file:line``.
    """

    __slots__ = ()

"""The delta codecs installed: built-in and plugins' (the ``delta-codec`` hook).

Looked up here, below both of their users: the object store decodes packed
objects with them (`fmhub.core.packfile`), the clean filter encodes chain links
with them (`fmhub.core.deltas`) and readers decode those links (`fmhub.core.tensorio`).
"""

from __future__ import annotations

from fmhub.plugin import host

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from fmhub.plugin.interfaces import DeltaCodec


def codecs() -> dict[str, DeltaCodec]:
    """Codec name -> codec, for every installed delta codec."""
    return host.registry("delta-codec")

"""Built-in plugin: the ``lowrank`` delta codec (`fmhub.lowrank`), for updates such as a LoRA merged into its base."""

from __future__ import annotations

from fmhub import hookimpl
from fmhub.lowrank import LowRank


@hookimpl
def fmhub_delta_codecs():
    return [LowRank()]

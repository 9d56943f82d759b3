"""Built-in plugin: the low-rank delta codecs, for updates such as a LoRA merged into its base: ``lowrank-fixed``
(`fmhub.core.lowrank_fixed`: integer factors, what the clean filter writes) and ``lowrank`` (`fmhub.core.lowrank`: float
factors; `fmhub adapter merge` and lossy storage within a tolerance)."""

from __future__ import annotations

from fmhub import hookimpl
from fmhub.core.lowrank import LowRank
from fmhub.core.lowrank_fixed import LowRankFixed


@hookimpl
def fmhub_delta_codecs():
    return [LowRank(), LowRankFixed()]

"""Sizes: read from untrusted text, and shown to people."""

import re

MAX_UINT_DIGITS = 19  # 2**63 - 1 has 19 digits: every size and count fits a signed 64-bit integer, as on disk
# ASCII digits only ('\d' and str.isdigit() also take '²' and '٣', which int() then refuses or reads), no sign,
# no '_', no spaces, no leading zeros: one spelling per number, as the specs write them
_UINT = re.compile(r"(?:0|[1-9][0-9]{0,%d})" % (MAX_UINT_DIGITS - 1), re.ASCII)


def parse_uint(text: str) -> int | None:
    """``text`` as a canonical non-negative integer below 2**63, or None when it is anything else."""
    if not _UINT.fullmatch(text):
        return None
    value = int(text)
    return value if value < 1 << 63 else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"

"""Built-in plugin: ``pii``, redaction of personal data and secrets.

Kinds, found in this order (so a card number is not taken for a phone, nor
an IP address's digits): ``key`` (AWS access keys, GitHub/Slack/Google/Stripe
tokens, ``sk-`` keys, private key blocks, ``password=...``-style assignments,
long high-entropy hex or base64 tokens), ``email``, ``credit_card`` (13 to 19
digits, a card network's prefix and a valid Luhn checksum), ``ip`` (IPv4 and
IPv6, checked with `ipaddress`), ``phone`` (international ``+CC ...``, or
national numbers of 10 to 12 digits written in groups). Each match becomes
its kind's replacement (``<EMAIL>``, ...). The reason records how many of
each kind, never the matched text, so reports are safe to share.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import Field, field_validator

from fmhub import hookimpl
from fmhub.plugin.options import Options, parse_options
from fmhub.plugin.interfaces import CleanContext, Drop, Edit

KINDS = ("key", "email", "credit_card", "ip", "phone")
REPLACEMENTS = {"key": "<KEY>", "email": "<EMAIL>", "credit_card": "<CREDIT_CARD>", "ip": "<IP>", "phone": "<PHONE>"}

# secrets with a recognisable shape; a text is searched for one only when it holds its literal (see _FINDERS)
_PRIVATE_KEY = re.compile(r"-----BEGIN[A-Z ]*PRIVATE KEY-----.*?-----END[A-Z ]*PRIVATE KEY-----", re.DOTALL)
_AWS = re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|APKA)[A-Z0-9]{16}(?![A-Za-z0-9])")
_GITHUB = re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})(?![A-Za-z0-9_])")
_SK = re.compile(r"(?<![\w-])sk-[A-Za-z0-9_-]{20,}")
_SLACK = re.compile(r"(?<![\w-])xox[abposr]-[A-Za-z0-9-]{10,}")
_GOOGLE = re.compile(r"(?<![\w-])AIza[0-9A-Za-z_-]{35}(?![\w-])")
_STRIPE = re.compile(r"(?<![\w-])[rs]k_(?:live|test)_[0-9A-Za-z]{16,}")
_ASSIGNED = re.compile(r"(?i)\b((?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|token|password|passwd|pwd)[\"']?\s*[:=]\s*[\"']?)([^\s\"',;]{8,})")
_HEX = re.compile(r"(?<![\w/+=-])[0-9a-fA-F]{32,}(?![\w/+=-])")
_B64 = re.compile(r"(?<![\w/+=-])[A-Za-z0-9+/_-]{32,}={0,2}(?![\w/+=-])")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])")
_CARD = re.compile(r"(?<![\d+-])\d(?:[ -]?\d){12,18}(?![\d-])")
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|3[0689]|6)")
_IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?!\.?\d)")
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.\d{1,3}){0,3}(?![\w:])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,8}){1,5}(?![\w])|(?<![\w+])\+\d{8,15}(?!\w)")
_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a string of digits (the last one the check digit)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _is_secret_token(tok: str) -> bool:
    """A long token that looks random: hex with letters and digits, or base64 with both cases, digits and high entropy."""
    if _HEX.fullmatch(tok):
        return any(c.isdigit() for c in tok) and any(c.isalpha() for c in tok) and _entropy(tok) >= 3.0
    body = tok.rstrip("=")
    return (any(c.isdigit() for c in body) and any(c.islower() for c in body) and any(c.isupper() for c in body)
            and _entropy(body) >= 4.0)


def _card_ok(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group())
    return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits)) and luhn_ok(digits)


def _ipv6_ok(m: re.Match) -> bool:
    s = m.group()
    if s.count(":") < 2 or sum(c not in ":." for c in s) < 4:
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def _phone_ok(m: re.Match) -> bool:
    s = m.group()
    digits = sum(c.isdigit() for c in s)
    if s.startswith("+"):
        return 8 <= digits <= 15
    if _DATE.match(s):
        return False
    return 10 <= digits <= 12 or (s.startswith("(") and 7 <= digits <= 12)


def _ipv4_ok(m: re.Match) -> bool:
    return all(int(octet) <= 255 and (octet == "0" or not octet.startswith("0")) for octet in m.group().split("."))


_NO_DIGITS = str.maketrans("", "", "0123456789")
_AWS_HINT = re.compile("A(?:KIA|SIA|BIA|CCA|GPA|IDA|ROA|NPA|NVA|PKA)")  # starts with a literal: a fast scan
_LONG = re.compile(r"[A-Za-z0-9+/_=-]{32}")
_DIGIT_DOT = re.compile(r"\d\.\d")


class _Text:
    """What the triggers look at, computed once per text (and again after a replacement)."""

    __slots__ = ("text", "lower", "digits")

    def __init__(self, text: str) -> None:
        self.text, self.lower = text, text.lower()
        self.digits = len(text) - len(text.translate(_NO_DIGITS))


def _any(*literals: str) -> Callable[[_Text], bool]:
    return lambda t: any(lit in t.text for lit in literals)


# kind -> [(pattern, accept(match) or None, group to replace (0: all), trigger)]: a pattern runs only when its
# cheap trigger says the text may hold a match, so most rows skip most regexes (prose: ~15 µs a row in all)
_FINDERS: dict[str, list[tuple[re.Pattern, Callable[[re.Match], bool] | None, int, Callable[[_Text], bool]]]] = {
    "key": [
        (_PRIVATE_KEY, None, 0, _any("PRIVATE KEY")),
        (_AWS, None, 0, lambda t: _AWS_HINT.search(t.text) is not None),
        (_GITHUB, None, 0, lambda t: "_" in t.text and ("gh" in t.text or "github_pat_" in t.text)),
        (_SK, None, 0, _any("sk-")),
        (_SLACK, None, 0, _any("xox")),
        (_GOOGLE, None, 0, _any("AIza")),
        (_STRIPE, None, 0, lambda t: "k_live_" in t.text or "k_test_" in t.text),
        (_ASSIGNED, None, 2, lambda t: ("=" in t.text or ":" in t.text) and any(k in t.lower for k in ("key", "secret", "token", "passw", "pwd"))),
        # the secrets this finds have digits (see _is_secret_token)
        (_B64, lambda m: _is_secret_token(m.group()), 0, lambda t: t.digits > 0 and _LONG.search(t.text) is not None),
    ],
    "email": [(_EMAIL, None, 0, _any("@"))],
    "credit_card": [(_CARD, _card_ok, 0, lambda t: t.digits >= 13)],
    "ip": [(_IPV6, _ipv6_ok, 0, lambda t: t.text.count(":") >= 2),
           (_IPV4, _ipv4_ok, 0, lambda t: t.digits >= 4 and _DIGIT_DOT.search(t.text) is not None)],
    "phone": [(_PHONE, _phone_ok, 0, lambda t: t.digits >= 7)],
}


# every trigger above needs one of these in the text: a text with none (most prose) is searched once, in C
_HINTS = re.compile(r"PRIVATE KEY|" + _AWS_HINT.pattern + r"|gh[pousr]_|github_pat_|sk-|xox|AIza|k_live_|k_test_|[=:@0-9]")


def redact(text: str, kinds: Sequence[str], replacements: Mapping[str, str], counts: Counter) -> str:
    """``text`` with every match of ``kinds`` replaced; adds what it found to ``counts``."""
    if _HINTS.search(text) is None:
        return text
    facts = _Text(text)
    for kind in kinds:
        for pattern, accept, group, trigger in _FINDERS[kind]:
            if not trigger(facts):
                continue

            def sub(m: re.Match, kind=kind, accept=accept, group=group) -> str:
                if accept is not None and not accept(m):
                    return m.group()
                counts[kind] += 1
                return m.group()[: m.start(group) - m.start()] + replacements[kind] if group else replacements[kind]

            new = pattern.sub(sub, facts.text)
            if new != facts.text:
                facts = _Text(new)
    return facts.text


class PiiOptions(Options):
    kinds: list[Literal["key", "email", "credit_card", "ip", "phone"]] = Field(default_factory=lambda: list(KINDS))
    replacements: dict[Literal["key", "email", "credit_card", "ip", "phone"], str] = Field(default_factory=dict)
    action: Literal["redact", "drop"] = Field("redact", description="redact: replace in place; drop: drop rows that hold any")

    @field_validator("kinds", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


@dataclass(frozen=True)
class PiiConfig:
    columns: tuple[str, ...]
    kinds: tuple[str, ...]
    replacements: Mapping[str, str]
    drop: bool


class Pii:
    """Redacts (or drops rows holding) emails, phone numbers, IP addresses, card numbers and secrets."""

    name = "pii"
    scope = "row"

    def configure(self, options: Mapping[str, Any], context: CleanContext) -> PiiConfig:
        opts = parse_options(self.name, PiiOptions, options)
        kinds = tuple(k for k in KINDS if k in opts.kinds)  # always in the safe order
        return PiiConfig(tuple(context.columns), kinds, {**REPLACEMENTS, **opts.replacements}, opts.action == "drop")

    def clean(self, rows: Sequence[Mapping[str, Any]], config: PiiConfig) -> list:
        out: list = []
        for row in rows:
            new, counts = None, Counter()
            for col in config.columns:
                value = row.get(col)
                if not isinstance(value, str):
                    continue
                red = redact(value, config.kinds, config.replacements, counts)
                if red != value:
                    new = new if new is not None else dict(row)
                    new[col] = red
            if new is None:
                out.append(None)
                continue
            found = ", ".join(f"{counts[k]} {k}" for k in KINDS if counts[k])
            detail = {k: counts[k] for k in KINDS if counts[k]}
            out.append(Drop(f"holds {found}", detail, shown=new) if config.drop else Edit(new, f"redacted {found}", detail))
        return out


@hookimpl
def fmhub_cleaners():
    return [Pii()]

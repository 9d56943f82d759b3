"""Built-in plugin: row filters ``length``, ``regex`` and ``quality`` (Gopher-style heuristics).

Each judges one row's text alone (the step's ``columns``, joined by newlines),
so all run in the data backend's workers.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from pydantic import Field, field_validator, model_validator

from fmhub import hookimpl
from fmhub.plugin.options import Options, parse_options, text_of
from fmhub.plugin.interfaces import CleanContext, Drop, Edit

# ---------------------------------------------------------------- length


class LengthOptions(Options):
    min_chars: Optional[int] = Field(None, ge=0)
    max_chars: Optional[int] = Field(None, ge=0)
    min_words: Optional[int] = Field(None, ge=0)
    max_words: Optional[int] = Field(None, ge=0)
    columns: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _bounds(self) -> "LengthOptions":
        if all(v is None for v in (self.min_chars, self.max_chars, self.min_words, self.max_words)):
            raise ValueError("give at least one of min_chars, max_chars, min_words, max_words")
        for unit in ("chars", "words"):
            lo, hi = getattr(self, f"min_{unit}"), getattr(self, f"max_{unit}")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"min_{unit} {lo} is above max_{unit} {hi}")
        return self


class Length:
    """Drops rows whose text is shorter or longer than bounds in characters and/or words."""

    name = "length"
    scope = "row"

    def configure(self, options: Mapping[str, Any], context: CleanContext) -> LengthOptions:
        return parse_options(self.name, LengthOptions, {**options, "columns": context.columns})

    def clean(self, rows: Sequence[Mapping[str, Any]], config: LengthOptions) -> list:
        out: list = []
        count_words = config.min_words is not None or config.max_words is not None
        for row in rows:
            text = text_of(row, config.columns)
            if isinstance(text, Drop):
                out.append(text)
                continue
            out.append(_length_verdict(len(text), "chars", config.min_chars, config.max_chars)
                       or (count_words and _length_verdict(len(text.split()), "words", config.min_words, config.max_words))
                       or None)
        return out


def _length_verdict(n: int, unit: str, lo: int | None, hi: int | None) -> Drop | None:
    if lo is not None and n < lo:
        return Drop(f"{n} {unit} < min_{unit} {lo}", {f"{unit}": n})
    if hi is not None and n > hi:
        return Drop(f"{n} {unit} > max_{unit} {hi}", {f"{unit}": n})
    return None


# ---------------------------------------------------------------- regex


class RegexOptions(Options):
    drop: list[str] = Field(default_factory=list, description="drop rows matching any of these")
    require: list[str] = Field(default_factory=list, description="drop rows matching none of these")
    replace: dict[str, str] = Field(default_factory=dict, description="pattern -> replacement (re.sub syntax), in order")
    ignore_case: bool = False

    @field_validator("drop", "require", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


@dataclass(frozen=True)
class RegexConfig:
    columns: tuple[str, ...]
    drop: list[re.Pattern]
    require: list[re.Pattern]
    replace: list[tuple[re.Pattern, str]]


class Regex:
    """Drops rows that match (``drop``) or miss (``require``) patterns, or rewrites matches (``replace``)."""

    name = "regex"
    scope = "row"

    def configure(self, options: Mapping[str, Any], context: CleanContext) -> RegexConfig:
        opts = parse_options(self.name, RegexOptions, options)
        if not (opts.drop or opts.require or opts.replace):
            raise _error("give at least one of drop, require, replace", None)
        flags = re.IGNORECASE if opts.ignore_case else 0

        def compile_(option: str, pattern: str) -> re.Pattern:
            try:
                return re.compile(pattern, flags)
            except re.error as exc:
                raise _error(f"option '{option}': {pattern!r} is not a valid regular expression ({exc})", option) from None

        config = RegexConfig(
            tuple(context.columns),
            [compile_("drop", p) for p in opts.drop],
            [compile_("require", p) for p in opts.require],
            [(compile_("replace", p), r) for p, r in opts.replace.items()],
        )
        for pat, repl in config.replace:
            try:
                pat.sub(repl, "")  # a bad group reference in the replacement fails here, not in a worker
            except (re.error, IndexError) as exc:
                raise _error(f"option 'replace': replacement {repl!r} for {pat.pattern!r} is invalid ({exc})", "replace") from None
        return config

    def clean(self, rows: Sequence[Mapping[str, Any]], config: RegexConfig) -> list:
        drop, require, replace = config.drop, config.require, config.replace
        out: list = []
        for row in rows:
            text = text_of(row, config.columns)
            if isinstance(text, Drop):
                out.append(text)
                continue
            verdict = None
            for pat in drop:
                if pat.search(text):
                    verdict = Drop(f"matches /{pat.pattern}/", {"pattern": pat.pattern})
                    break
            if verdict is None and require and not any(p.search(text) for p in require):
                verdict = Drop(f"matches none of the required patterns ({', '.join('/' + p.pattern + '/' for p in require)})")
            if verdict is None and replace:
                verdict = _replace(row, config.columns, replace)
            out.append(verdict)
        return out


def _replace(row: Mapping[str, Any], columns: Sequence[str], replace: list) -> Edit | None:
    new = dict(row)
    counts: Counter = Counter()
    for col in columns:
        value = new.get(col)
        if not isinstance(value, str):
            continue
        for pat, repl in replace:
            value, n = pat.subn(repl, value)
            counts[pat.pattern] += n
        new[col] = value
    if not counts or not sum(counts.values()):
        return None
    what = ", ".join(f"{n} × /{p}/" for p, n in counts.items() if n)
    return Edit(new, f"replaced {what}", {"replacements": {p: n for p, n in counts.items() if n}})


def _error(message: str, option: str | None):
    from fmhub.plugin.options import OptionError

    return OptionError(f"regex: {message}", option=option)


# ---------------------------------------------------------------- quality

_BULLETS = ("•", "-", "*", "‣", "⁃", "◦", "▪", "·", "–")
_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_PUNCT = re.compile(r"^\W+|\W+$")


class QualityOptions(Options):
    """Gopher's rules (Rae et al. 2021, appendix A), with its thresholds as defaults; null turns a rule off."""

    min_words: Optional[int] = Field(50, ge=0)
    max_words: Optional[int] = Field(100_000, ge=0)
    min_mean_word_length: Optional[float] = Field(3.0, ge=0)
    max_mean_word_length: Optional[float] = Field(10.0, ge=0)
    max_symbol_word_ratio: Optional[float] = Field(0.1, ge=0)
    max_bullet_lines: Optional[float] = Field(0.9, ge=0, le=1)
    max_ellipsis_lines: Optional[float] = Field(0.3, ge=0, le=1)
    min_alpha_words: Optional[float] = Field(0.8, ge=0, le=1)
    min_stop_words: Optional[int] = Field(None, ge=0, description="Gopher uses 2 (English stop words); off by default")
    max_duplicate_lines: Optional[float] = Field(0.3, ge=0, le=1)
    max_duplicate_line_chars: Optional[float] = Field(0.2, ge=0, le=1)
    max_duplicate_paragraphs: Optional[float] = Field(0.3, ge=0, le=1)
    max_duplicate_paragraph_chars: Optional[float] = Field(0.2, ge=0, le=1)
    max_top_ngram: dict[int, float] = Field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_duplicate_ngrams: dict[int, float] = Field(default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    columns: tuple[str, ...] = ()

    @field_validator("max_top_ngram", "max_duplicate_ngrams", mode="before")
    @classmethod
    def _ngram_table(cls, v: Any) -> Any:
        if v is None:
            return {}
        if isinstance(v, dict) and any(not isinstance(k, int) or k < 1 or k > 20 for k in v):
            raise ValueError("keys are n-gram sizes, 1 to 20")
        return v


class Quality:
    """Drops rows that fail Gopher-style quality heuristics; the reason names the first rule failed and the value."""

    name = "quality"
    scope = "row"

    def configure(self, options: Mapping[str, Any], context: CleanContext) -> QualityOptions:
        return parse_options(self.name, QualityOptions, {**options, "columns": context.columns})

    def clean(self, rows: Sequence[Mapping[str, Any]], config: QualityOptions) -> list:
        out: list = []
        for row in rows:
            text = text_of(row, config.columns)
            out.append(text if isinstance(text, Drop) else quality_verdict(text, config))
        return out


def _check(rule: str, value: float, limit: float | None, low: bool, what: str | None = None, **detail: Any) -> Drop | None:
    if limit is None or (value >= limit if low else value <= limit):
        return None
    what = what or rule.split("_", 1)[1].replace("_", " ")
    return Drop(f"{what} {value:.3g} {'<' if low else '>'} {limit:g} ({rule})", {"rule": rule, "value": round(value, 4), "limit": limit, **detail})


def quality_verdict(text: str, c: QualityOptions) -> Drop | None:
    """The first Gopher rule ``text`` fails, as a `Drop`, or None when it passes them all."""
    words = text.split()
    n = len(words)
    if n == 0:
        return Drop("no words", {"rule": "min_words", "value": 0})
    checks = [
        ("min_words", n, c.min_words, True),
        ("max_words", n, c.max_words, False),
    ]
    for rule, value, limit, low in checks:
        if (d := _check(rule, value, limit, low)) is not None:
            return d
    mean_len = sum(map(len, words)) / n
    symbols = text.count("#") + text.count("...") + text.count("…")
    lines = [ln for ln in text.split("\n") if ln.strip()]
    n_lines = max(len(lines), 1)
    bullets = sum(ln.lstrip().startswith(_BULLETS) for ln in lines)
    ellipsis = sum(ln.rstrip().endswith(("...", "…")) for ln in lines)
    alpha = sum(any(ch.isalpha() for ch in w) for w in words)
    checks = [
        ("min_mean_word_length", mean_len, c.min_mean_word_length, True),
        ("max_mean_word_length", mean_len, c.max_mean_word_length, False),
        ("max_symbol_word_ratio", symbols / n, c.max_symbol_word_ratio, False),
        ("max_bullet_lines", bullets / n_lines, c.max_bullet_lines, False),
        ("max_ellipsis_lines", ellipsis / n_lines, c.max_ellipsis_lines, False),
        ("min_alpha_words", alpha / n, c.min_alpha_words, True),
    ]
    if c.min_stop_words is not None:
        checks.append(("min_stop_words", sum(w.lower() in _STOP_WORDS for w in words), c.min_stop_words, True))
    for rule, value, limit, low in checks:
        if (d := _check(rule, value, limit, low)) is not None:
            return d
    for unit, parts, max_frac, max_chars in (
        ("lines", [ln.strip() for ln in lines], c.max_duplicate_lines, c.max_duplicate_line_chars),
        ("paragraphs", [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()], c.max_duplicate_paragraphs, c.max_duplicate_paragraph_chars),
    ):
        frac, chars = _duplicate_fraction(parts)
        suffix = unit[:-1]
        for rule, value, limit in ((f"max_duplicate_{unit}", frac, max_frac), (f"max_duplicate_{suffix}_chars", chars, max_chars)):
            if (d := _check(rule, value, limit, False)) is not None:
                return d
    norm = [w for w in (_PUNCT.sub("", w.lower()) for w in words) if w]
    total = sum(map(len, norm)) or 1
    for k, limit in sorted(c.max_top_ngram.items()):
        if (d := _check("max_top_ngram", _top_ngram_fraction(norm, k, total), limit, False, f"top {k}-gram char fraction", n=k)) is not None:
            return d
    for k, limit in sorted(c.max_duplicate_ngrams.items()):
        if (d := _check("max_duplicate_ngrams", _duplicate_ngram_fraction(norm, k, total), limit, False, f"duplicate {k}-gram char fraction", n=k)) is not None:
            return d
    return None


def _duplicate_fraction(parts: list[str]) -> tuple[float, float]:
    """(fraction of parts that repeat an earlier one, fraction of characters in them)."""
    if not parts:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = 0
    for p in parts:
        if p in seen:
            dup += 1
            dup_chars += len(p)
        else:
            seen.add(p)
    return dup / len(parts), dup_chars / (sum(map(len, parts)) or 1)


def _top_ngram_fraction(words: list[str], k: int, total: int) -> float:
    """Characters covered by the most frequent word k-gram, counted once per occurrence, over all word characters."""
    if len(words) < k:
        return 0.0
    counts = Counter(tuple(words[i:i + k]) for i in range(len(words) - k + 1))
    gram, count = counts.most_common(1)[0]
    return 0.0 if count < 2 else sum(map(len, gram)) * count / total


def _duplicate_ngram_fraction(words: list[str], k: int, total: int) -> float:
    """Characters of words inside a k-gram that occurred earlier in the text, over all word characters."""
    if len(words) < k:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - k + 1):
        gram = tuple(words[i:i + k])
        if gram in seen:
            covered[i:i + k] = [True] * k
        else:
            seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c) / total


@hookimpl
def fmhub_cleaners():
    return [Length(), Regex(), Quality()]

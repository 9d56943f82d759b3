"""Built-in plugin: the ``language`` filter, with a small dependency-free detector.

The detector knows English, German, French, Spanish, Italian, Dutch and
Portuguese by their function words, which make up a third to a half of
running text in each of them: every word of the text that is a function word
of a language votes for it, split evenly between the languages that share the
word ("de" is Spanish, French, Dutch and Portuguese; "und" only German). The
score of a language is its votes over the number of words, so ordinary prose
scores 0.2 to 0.5 for its language and near 0 for the others; text in a
language the detector does not know scores near 0 everywhere and comes out
``und`` (undetermined). Letters only some languages use (ß, ñ, ã/õ, ij)
break near ties. It needs a few words: rows shorter than ``min_words`` are
kept unjudged by default.

Why not a PyPI detector: fastText's ``lid.176`` needs a 130 MB model download
at run time, and ``langdetect`` is random unless seeded and slow; for
filtering web text to a handful of European languages, function words are
accurate on anything longer than a sentence (see tests/unit/test_cleaners.py).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Mapping, Sequence

from pydantic import Field, field_validator

from fmhub import hookimpl
from fmhub.plugin.options import Options, parse_options, text_of
from fmhub.plugin.interfaces import CleanContext, Drop

_WORDS = {
    "en": """the be to of and a in that have i it for not on with he as you do at this but his by from they we say
        her she or an will my one all would there their what so up out if about who get which go me when make can
        like time no just him know take people into year your good some could them see other than then now look
        only come its over think also back after use two how our work first well way even new want because any these
        give day most us is are was were been has had does did should very where why more such through while those
        been being here much many said each""",
    "de": """der die das und ist nicht ein eine einen einem einer zu den dem des mit sich auf für von im auch es an werden
        aus er hat dass daß sie nach wird bei noch wie um am sind über vor wir zum zur aber ich nur oder war kann wenn
        man diese dieser dieses haben schon sehr durch mehr wurde wo hier jetzt heute immer gibt also bis alle unter
        weil dann ihr uns mir mich was wer ohne gegen zwischen doch sein seine ihre keine kein viel etwas wieder
        habe hatte wurden können muss soll will""",
    "fr": """le la les de des du un une et est en que qui dans pour pas ne sur au aux il elle ils elles nous vous je avec
        ce cette ces se sa son ses plus par mais ou où sont été être avoir fait comme tout tous très bien aussi on
        leur leurs y peut deux même entre sans après avant chez donc alors encore toujours déjà notre votre cela ça
        c l d qu n s j était ont aussi lui moi quand faire fois""",
    "es": """el la los las de del que y en un una unos unas es por con no para se lo al como más pero sus su le ya o
        este esta estos estas ha sí porque muy sin sobre también me hasta hay donde quien desde todo nos durante todos
        uno les ni contra otros ese eso ante ellos e esto mí antes algunos qué entre cuando son fue ser era está están
        estaba hace puede pueden tiene tienen dos años mucho muchos cada otra aunque mientras después ahora entonces
        siempre nunca usted yo él ella nosotros""",
    "pt": """o a os as de do da dos das e que em no na nos nas um uma para com não por se mais como mas foi ao aos ele
        ela eles elas seu sua seus suas ou ser quando muito há já está eu também só pelo pela pelos pelas até isso isto
        entre era depois sem mesmo ter tem têm são estão você vocês essa esse este esta aquele nós num numa onde
        porque sobre ainda agora sempre nunca então bem cada outro outra pode fazer dois anos muitos antes me lhe
        te minha meu""",
    "it": """il lo la i gli le di del della dei delle degli dello da dal dalla in nel nella nei con su sul sulla per tra
        fra e ed è che non un uno una si ci ne mi ti ma anche come più o se sono era essere stato stata ha hanno ho
        questo questa questi quello quella molto tutto tutti ancora già sempre perché quando dove cosa lui lei noi voi
        loro suo sua suoi al alla ai alle nell dell all sull l d c poi solo dopo oggi ogni però così può fare""",
    "nl": """de het een en van in is dat op te zijn niet met voor die er aan ook als bij door om maar naar dan hij zij ze
        we wij ik je jij u was werd worden wordt heeft hebben had kan kunnen zal zou nog al wel geen meer uit over
        tot na wat wie waar hoe dit deze onze hun haar omdat want veel heel alleen altijd nu hier daar toen tussen
        zonder onder tegen iets niets alles echt gaat gaan""",
}
LANGUAGES = tuple(_WORDS)

# word -> [(language, weight)]: a word shared by k languages gives each 1/k
_VOTES: dict[str, list[tuple[str, float]]] = defaultdict(list)
for _lang, _text in _WORDS.items():
    for _w in set(_text.split()):
        _VOTES[_w].append((_lang, 0.0))
for _w, _langs in _VOTES.items():
    _VOTES[_w] = [(lang, 1.0 / len(_langs)) for lang, _ in _langs]
_VOTES = dict(_VOTES)

# letters that only some of the languages use: a small nudge for near ties
_LETTERS = {"ß": ("de",), "ñ": ("es",), "¿": ("es",), "¡": ("es",), "ã": ("pt",), "õ": ("pt",), "ç": ("fr", "pt"),
            "ij": ("nl",), "ò": ("it",), "ì": ("it",), "ê": ("fr", "pt"), "è": ("fr", "it")}
# endings typical of one language's words ("-ção" Portuguese, "-ción" Spanish): half a vote per word
_ENDINGS = {"ção": "pt", "ções": "pt", "ão": "pt", "ción": "es", "ciones": "es", "zione": "it", "zioni": "it",
            "ung": "de", "heit": "de", "keit": "de", "lijk": "nl", "eux": "fr", "aux": "fr"}
_ENDING = re.compile(r"(" + "|".join(sorted(_ENDINGS, key=len, reverse=True)) + r")$")
_TOKEN = re.compile(r"[^\W\d_]+")


def detect(text: str) -> tuple[str, float, int]:
    """``(language, score, words)``: the best-scoring language code (``und`` when none scores), its score, the word count."""
    words = _TOKEN.findall(text.lower())
    if not words:
        return "und", 0.0, 0
    scores: dict[str, float] = dict.fromkeys(LANGUAGES, 0.0)
    for w in words:
        for lang, weight in _VOTES.get(w, ()):
            scores[lang] += weight
        if len(w) > 4 and (m := _ENDING.search(w)):
            scores[_ENDINGS[m.group(1)]] += 0.5
    lowered = text.lower()
    for letters, langs in _LETTERS.items():
        if letters in lowered:
            for lang in langs:
                scores[lang] += 0.5 / len(langs)
    best = max(scores, key=scores.__getitem__)
    score = min(1.0, scores[best] / len(words))
    return (best if scores[best] > 0 else "und"), round(score, 3), len(words)


class LanguageOptions(Options):
    allow: list[str] = Field(min_length=1, description="language codes to keep (en, de, fr, es, it, nl, pt; und: undetermined)")
    min_score: float = Field(0.15, ge=0, le=1, description="below this the text is undetermined (und)")
    min_words: int = Field(5, ge=0, description="shorter texts cannot be told apart: kept unless judge_short")
    judge_short: bool = False
    columns: tuple[str, ...] = ()

    @field_validator("allow", mode="before")
    @classmethod
    def _codes(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str) else v
        if isinstance(v, list):
            unknown = [c for c in v if c not in LANGUAGES + ("und",)]
            if unknown:
                raise ValueError(f"unknown language {', '.join(map(repr, unknown))}; the detector knows {', '.join(LANGUAGES)} (and und)")
        return v


class Language:
    """Drops rows whose detected language is not in ``allow``; the reason gives the language and its score."""

    name = "language"
    scope = "row"

    def configure(self, options: Mapping[str, Any], context: CleanContext) -> LanguageOptions:
        return parse_options(self.name, LanguageOptions, {**options, "columns": context.columns})

    def clean(self, rows: Sequence[Mapping[str, Any]], config: LanguageOptions) -> list:
        out: list = []
        allow = set(config.allow)
        for row in rows:
            text = text_of(row, config.columns)
            if isinstance(text, Drop):
                out.append(text)
                continue
            lang, score, n = detect(text)
            if n < config.min_words and not config.judge_short:
                out.append(None)
                continue
            if score < config.min_score:
                lang = "und"
            if lang in allow:
                out.append(None)
            else:
                out.append(Drop(f"language {lang} (score {score:.2f}) not in {', '.join(config.allow)}",
                                {"language": lang, "score": score}))
        return out


@hookimpl
def fmhub_cleaners():
    return [Language()]

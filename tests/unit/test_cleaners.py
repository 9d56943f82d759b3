"""The built-in cleaners on realistic rows, each looked up through the plugin host as a pipeline would."""

from __future__ import annotations

import random

import pytest

from fmhub.plugin import host
from fmhub.plugin.options import OptionError as CleanerError
from fmhub.plugin.interfaces import CleanContext, Drop, Edit


def verdicts(name: str, rows: list[dict], columns=("text",), **options) -> list:
    """Run one step over ``rows`` the way the pipeline does: configure, then clean (row) or prepare + pass (dataset)."""
    cleaner = host.lookup("cleaner", name)
    config = cleaner.configure(options, CleanContext(tuple(columns), "."))
    if cleaner.scope == "row":
        return list(cleaner.clean(rows, config))
    prepared = cleaner.prepare(rows, config) if hasattr(cleaner, "prepare") else rows
    return list(cleaner.open(config).clean(list(range(len(rows))), prepared))


def texts(*values: str) -> list[dict]:
    return [{"text": v} for v in values]


def test_every_builtin_is_registered_with_its_scope():
    cleaners = host.registry("cleaner")
    assert {(n, c.scope) for n, c in cleaners.items()} >= {
        ("length", "row"), ("regex", "row"), ("quality", "row"), ("language", "row"), ("pii", "row"), ("schema", "row"),
        ("dedup", "dataset"), ("near-dup", "dataset")}


# ---------------------------------------------------------------- length, regex


def test_length_bounds_in_chars_and_words():
    rows = texts("one two", "one two three four", "x" * 50, "")
    v = verdicts("length", rows, min_words=3, max_chars=40)
    assert v[0].reason == "2 words < min_words 3"
    assert v[1] is None
    assert v[2].reason == "50 chars > max_chars 40"
    assert v[3].reason == "0 words < min_words 3"


def test_length_drops_rows_without_the_text_column_and_joins_columns():
    v = verdicts("length", [{"body": "a b c"}, {"text": 3}], min_words=1)
    assert v[0].reason == "no column 'text'" and v[1].reason == "column 'text' holds int, not text"
    rows = [{"title": "short", "body": "two more words"}]
    assert verdicts("length", rows, columns=("title", "body"), min_words=4) == [None]


def test_length_refuses_bad_options_naming_the_option():
    with pytest.raises(CleanerError, match="min_chars 10 is above max_chars 5"):
        verdicts("length", [], min_chars=10, max_chars=5)
    with pytest.raises(CleanerError, match="option 'min_word'.*takes: min_chars") as exc:
        verdicts("length", [], min_word=1)
    assert exc.value.option == "min_word"


def test_regex_drop_require_replace():
    rows = texts("Buy cheap pills now", "A recipe for bread", "call 555 now", "nothing here")
    v = verdicts("regex", rows, drop=[r"\bcheap\b"], require=["recipe|call"], replace={r"\d+": "<N>"}, ignore_case=True)
    assert isinstance(v[0], Drop) and "cheap" in v[0].reason
    assert v[1] is None
    assert isinstance(v[2], Edit) and v[2].row == {"text": "call <N> now"} and "1 ×" in v[2].reason
    assert isinstance(v[3], Drop) and "none of the required" in v[3].reason
    with pytest.raises(CleanerError) as exc:
        verdicts("regex", [], drop=["(unclosed"])
    assert exc.value.option == "drop"


# ---------------------------------------------------------------- quality

PROSE = (
    "The committee met on Tuesday to discuss the budget for the coming year. Several members argued that the "
    "library needed more money for new books, while others wanted to repair the roof of the town hall first. "
    "After a long debate, they agreed to split the funds and to review the decision again in the spring, when "
    "the final accounts of the winter festival would be known to everyone."
)


def test_quality_keeps_prose_and_names_the_rule_a_bad_text_fails():
    spam = "\n".join(["Click here to win a prize today"] * 12)
    hashes = " ".join(["#tag #deal #win"] * 30)
    dots = "\n".join(f"Read more about topic number {i} in our long article..." for i in range(12))
    numbers = "Totals: " + " ".join(f"{i * 37:05d}" for i in range(60))
    v = verdicts("quality", texts(PROSE, spam, hashes, dots, numbers, "too short to judge"))
    assert v[0] is None
    assert v[1].detail["rule"] == "max_duplicate_lines" and v[1].detail["value"] > 0.3
    assert v[2].detail["rule"] == "max_symbol_word_ratio"
    assert v[3].detail["rule"] == "max_ellipsis_lines"
    assert v[4].detail["rule"] == "min_alpha_words"
    assert v[5].detail["rule"] == "min_words"
    assert "(max_duplicate_lines)" in v[1].reason


def test_quality_repeated_ngrams_and_disabled_rules():
    looped = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    v = verdicts("quality", texts(looped))
    assert v[0].detail["rule"] in ("max_top_ngram", "max_duplicate_ngrams")
    off = verdicts("quality", texts(looped), max_top_ngram=None, max_duplicate_ngrams=None)
    assert off == [None]
    assert verdicts("quality", texts("just a few words"), min_words=None) == [None]


# ---------------------------------------------------------------- language

SAMPLES = {
    "en": "The weather was nice yesterday, so we went for a long walk in the park and talked about our plans for the summer.",
    "de": "Gestern war das Wetter schön, deshalb sind wir im Park spazieren gegangen und haben über unsere Pläne für den Sommer gesprochen.",
    "fr": "Hier, il faisait beau, alors nous sommes allés nous promener dans le parc et nous avons parlé de nos projets pour l'été.",
    "es": "Ayer hizo buen tiempo, así que fuimos a dar un largo paseo por el parque y hablamos de nuestros planes para el verano.",
    "it": "Ieri il tempo era bello, così siamo andati a fare una lunga passeggiata nel parco e abbiamo parlato dei nostri progetti per l'estate.",
    "nl": "Gisteren was het mooi weer, dus we gingen een lange wandeling maken in het park en praatten over onze plannen voor de zomer.",
    "pt": "Ontem o tempo estava bom, então fomos dar um longo passeio no parque e conversamos sobre os nossos planos para o verão.",
}
SHORT = {
    "en": "Please send me the report before the meeting on Monday.",
    "de": "Bitte schicken Sie mir den Bericht vor dem Treffen am Montag.",
    "fr": "Merci de m'envoyer le rapport avant la réunion de lundi.",
    "es": "Por favor, envíame el informe antes de la reunión del lunes.",
    "it": "Per favore mandami il rapporto prima della riunione di lunedì.",
    "nl": "Stuur me alsjeblieft het rapport voor de vergadering op maandag.",
    "pt": "Por favor, envie-me o relatório antes da reunião de segunda-feira.",
}


@pytest.mark.parametrize("lang", sorted(SAMPLES))
def test_language_detects_each_known_language(lang):
    from fmhub_plugins.clean_language import detect

    for text in (SAMPLES[lang], SHORT[lang]):
        got, score, _ = detect(text)
        assert got == lang and score >= 0.15, (text, got, score)


def test_language_filter_keeps_allowed_and_names_the_detected_language():
    rows = texts(SAMPLES["en"], SAMPLES["de"], SAMPLES["fr"],
                 "Вчера была хорошая погода, поэтому мы долго гуляли в парке и говорили о наших планах на лето.",
                 "Igår var vädret fint, så vi tog en lång promenad i parken och pratade om våra planer för sommaren.",
                 "ok thanks")
    v = verdicts("language", rows, allow=["en", "de"])
    assert v[0] is None and v[1] is None
    assert v[2].detail["language"] == "fr" and v[2].reason.startswith("language fr (score 0.")
    assert v[3].detail["language"] == "und" and v[4].detail["language"] == "und"
    assert v[5] is None  # two words: too short to tell, kept
    assert isinstance(verdicts("language", rows[5:], allow=["de"], judge_short=True)[0], Drop)
    with pytest.raises(CleanerError, match="unknown language 'xx'"):
        verdicts("language", [], allow=["en", "xx"])


# ---------------------------------------------------------------- pii

PII_ROWS = {
    "Write to jane.doe@example.com or j_smith+news@mail.co.uk.": ({"email": 2}, "Write to <EMAIL> or <EMAIL>."),
    "Call (555) 123-4567 or +44 20 7946 0958, office 030 1234567.": ({"phone": 3}, "Call <PHONE> or <PHONE>, office <PHONE>."),
    "Server 192.168.1.10 and 2001:db8::8a2e:370:7334 were down.": ({"ip": 2}, "Server <IP> and <IP> were down."),
    "Visa 4111 1111 1111 1111, typo 4111 1111 1111 1112.": ({"credit_card": 1}, "Visa <CREDIT_CARD>, typo 4111 1111 1111 1112."),
    "aws AKIAIOSFODNN7EXAMPLE gh ghp_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ key sk-proj-abcdefghijklmnopqrstuvwx1234":
        ({"key": 3}, "aws <KEY> gh <KEY> key <KEY>"),
    "secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY and password: hunter2hunter2":
        ({"key": 2}, "secret <KEY> and password: <KEY>"),
}
CLEAN_TEXTS = [
    "Meeting on 2021-03-04 at 12:30:45, version 1.2.3, prices 12.50 and 13.75, 10 000 visitors.",
    "std::vector<int> is a C++ type; the ISBN is 978-3-16-148410-0.",
    "Pneumonoultramicroscopicsilicovolcanoconiosis is a long English word.",
]


def test_pii_redacts_each_kind_and_records_counts_only():
    rows = texts(*PII_ROWS)
    v = verdicts("pii", rows)
    for (original, (counts, redacted)), verdict in zip(PII_ROWS.items(), v):
        assert isinstance(verdict, Edit), original
        assert verdict.row == {"text": redacted}
        assert verdict.detail == counts
        for token in original.split():
            if any(ch.isdigit() for ch in token) and len(token) > 6 and token not in redacted:
                assert token.strip(".,") not in verdict.reason  # the reason never quotes what it removed


def test_pii_leaves_ordinary_numbers_alone():
    assert verdicts("pii", texts(*CLEAN_TEXTS)) == [None] * len(CLEAN_TEXTS)


def test_pii_luhn_and_card_prefixes():
    from fmhub_plugins.clean_pii import luhn_ok

    assert luhn_ok("4111111111111111") and luhn_ok("5500005555555559") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112")
    # Luhn-valid but no card network starts with 9: not redacted
    assert verdicts("pii", texts("ref 9111 1111 1111 1113"), kinds=["credit_card"]) == [None]


def test_pii_options_kinds_replacements_drop():
    row = {"text": "mail a@b.io from 10.0.0.1", "id": 7}
    v = verdicts("pii", [row], kinds=["email"], replacements={"email": "[redacted]"})
    assert v[0].row == {"text": "mail [redacted] from 10.0.0.1", "id": 7}
    d = verdicts("pii", [row], action="drop")[0]
    assert isinstance(d, Drop) and d.detail == {"email": 1, "ip": 1}
    assert d.shown == {"text": "mail <EMAIL> from <IP>", "id": 7}  # what reports may show instead
    with pytest.raises(CleanerError) as exc:
        verdicts("pii", [], kinds=["emails"])
    assert exc.value.option == "kinds"


# ---------------------------------------------------------------- schema


def test_schema_rename_fill_cast_require_prune():
    rows = [
        {"content": "a", "stars": "4", "lang": None, "junk": 1},
        {"content": "b", "stars": 5.0, "lang": "de"},
        {"content": "c", "stars": "four"},
        {"stars": 3},
        {"content": "e", "stars": [1, 2]},
    ]
    v = verdicts("schema", rows, rename={"content": "text"}, defaults={"lang": "en"}, cast={"stars": "int"},
                 require=["text"], drop_unknown=True)
    assert v[0].row == {"text": "a", "stars": 4, "lang": "en"}
    assert v[0].reason == "renamed content→text; filled lang; cast stars; dropped column junk"
    assert v[1].row == {"text": "b", "stars": 5, "lang": "de"}
    assert v[2].reason == "column 'stars': cannot cast str to int" and "four" not in v[2].reason
    assert v[3].reason == "required column 'text' missing or null"
    assert v[4].detail == {"column": "stars", "type": "list", "to": "int"}
    assert verdicts("schema", [{"text": "x", "n": 1}], cast={"n": "int"}) == [None]  # nothing to change


def test_schema_casts():
    from fmhub_plugins.clean_schema import _cast

    assert _cast("3", "int") == (True, 3) and _cast(3.5, "int") == (False, None) and _cast(True, "int") == (False, None)
    assert _cast("2.5", "float") == (True, 2.5) and _cast("nan", "float") == (False, None)
    assert _cast("Yes", "bool") == (True, True) and _cast(0, "bool") == (True, False) and _cast("maybe", "bool") == (False, None)
    assert _cast(False, "str") == (True, "false") and _cast({"a": 1}, "str") == (True, '{"a": 1}')
    with pytest.raises(CleanerError, match="at least one"):
        verdicts("schema", [])


# ---------------------------------------------------------------- dedup


def test_dedup_keeps_first_and_points_later_copies_at_it():
    rows = texts("Hello  world", "hello world", "Hello world ", "other")
    v = verdicts("dedup", rows)
    assert v[0] is None and v[1] is None and v[3] is None
    assert v[2].reason == "exact duplicate of position 0" and v[2].detail == {"duplicate_of": 0}
    v = verdicts("dedup", rows, casefold=True)
    assert [d.detail["duplicate_of"] if d else None for d in v] == [None, 0, 0, None]
    assert verdicts("dedup", rows, whitespace=False)[2] is None


def _doc(rng: random.Random, vocab: list[str], n: int = 80) -> list[str]:
    return [rng.choice(vocab) for _ in range(n)]


def _shingles(words: list[str], n: int = 3) -> set:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_near_dup_finds_planted_copies_and_keeps_distinct_texts():
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(3000)]
    originals = [_doc(rng, vocab) for _ in range(200)]
    planted = {}  # position -> (original position, true Jaccard)
    rows = [" ".join(d) for d in originals]
    for k in range(40):
        words = list(originals[k])
        for _ in range(2):  # two substitutions: Jaccard about 0.85
            words[rng.randrange(len(words))] = rng.choice(vocab)
        words.insert(rng.randrange(len(words)), "inserted")
        planted[len(rows)] = (k, len(_shingles(words) & _shingles(originals[k])) / len(_shingles(words) | _shingles(originals[k])))
        rows.append(" ".join(words))
    v = verdicts("near-dup", texts(*rows), threshold=0.7)
    found = {p: d.detail for p, d in enumerate(v) if d is not None}
    assert set(found) <= set(planted)  # no distinct text dropped
    assert len(found) >= 0.9 * len(planted)
    for p, detail in found.items():
        assert detail["duplicate_of"] == planted[p][0]
        assert abs(detail["jaccard"] - planted[p][1]) < 0.15
    assert all(v[i] is None for i in range(200))


def test_near_dup_without_verify_drops_every_band_collision():
    """verify: false is datatrove's rule (a shared band makes a duplicate): a pair below the threshold that shares a
    band is dropped; with the default check it is kept."""
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(3000)]
    nd = host.lookup("cleaner", "near-dup")
    config = nd.configure({"threshold": 0.7}, CleanContext(("text",), "."))

    def bands(p) -> set:
        return {p[1][i:i + 8] for i in range(0, len(p[1]), 8)}

    for _ in range(200):  # edited copies until one is below the threshold yet shares a band with its source
        doc = _doc(rng, vocab)
        copy = [rng.choice(vocab) if rng.random() < 0.12 else w for w in doc]
        true_j = len(_shingles(doc) & _shingles(copy)) / len(_shingles(doc) | _shingles(copy))
        rows = texts(" ".join(doc), " ".join(copy))
        prepared = nd.prepare(rows, config)
        if true_j < 0.6 and bands(prepared[0]) & bands(prepared[1]):
            break
    else:
        raise AssertionError("no edited copy below the threshold shared a band")
    assert verdicts("near-dup", rows, threshold=0.7) == [None, None]
    loose = verdicts("near-dup", rows, threshold=0.7, verify=False)
    assert loose[0] is None and loose[1].detail["duplicate_of"] == 0 and loose[1].detail["jaccard"] < 0.7
    with pytest.raises(CleanerError):
        verdicts("near-dup", rows, verify="sometimes")


def test_near_dup_char_shingles_signatures_are_deterministic():
    nd = host.lookup("cleaner", "near-dup")
    config = nd.configure({"shingle": "char", "ngram": 4}, CleanContext(("text",), "."))
    rows = texts("The quick brown fox jumps over the lazy dog.", "The quick brown fox jumped over the lazy dog!", "Sphinx of black quartz")
    a, b = nd.prepare(rows, config), nd.prepare(list(reversed(rows)), config)
    assert a == list(reversed(b))  # same text, same signature and band keys, in any batch
    v = nd.open(config).clean([0, 1, 2], a)
    assert v[0] is None and v[2] is None and v[1].detail["duplicate_of"] == 0
    assert verdicts("near-dup", texts("", "   ")) == [None, None]  # nothing to shingle: kept


def test_near_dup_batch_signatures_equal_one_text_at_a_time():
    """Hashing a batch at once (n-grams across the concatenated texts, straddlers removed) changes nothing."""
    import numpy as np

    from fmhub_plugins.clean_dedup import _perms, _minhash_segments, shingle_hashes, signatures

    nd = host.lookup("cleaner", "near-dup")
    rng = random.Random(1)
    batch = [" ".join(rng.choice("abcdefgh") for _ in range(rng.choice([0, 1, 2, 3, 5, 40]))) for _ in range(60)]
    batch += ["x" * 9000]  # one text longer than a matrix chunk, in characters
    for options in ({}, {"shingle": "char", "ngram": 4}, {"ngram": 1}):
        config = nd.configure(options, CleanContext(("text",), "."))
        together = signatures(batch, config)
        for text, sig in zip(batch, together):
            h = shingle_hashes(text, config)
            if not len(h):
                assert sig is None
                continue
            alone = _minhash_segments(h, np.array([len(h)]), *_perms(config.num_perm, config.seed))[0]
            assert (sig == alone).all() and sig.dtype == np.uint32 and len(sig) == config.num_perm

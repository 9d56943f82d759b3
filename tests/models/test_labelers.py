"""The built-in labelers (keyword, regex, lookup, python, model) on real rows, and how their failures are recorded."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from fmhub.plugin import host
from fmhub.plugin.interfaces import LabelContext, Labeler, LabellingFunction
from fmhub.data.label.votes import LFSpec, apply, vote_batch
from fmhub.plugin.options import OptionError as LabelerError
from fmhub.core.rows import Batch

CLASSES = ("negative", "positive")


def lf(kind, tmp_path=".", column="text", **options) -> LabellingFunction:
    return host.lookup("labeler", kind).configure(options, LabelContext(CLASSES, column, str(tmp_path)))


def votes(fn, texts, column="text"):
    return list(fn.vote([{column: t} for t in texts]))


def test_every_builtin_kind_is_a_labeler():
    kinds = host.registry("labeler")
    assert {"keyword", "regex", "lookup", "python", "model"} <= set(kinds)
    assert all(isinstance(k, Labeler) for k in kinds.values())


def test_keyword_matches_whole_words_any_or_all_case_insensitive():
    great = lf("keyword", words=["great", "love it"], label="positive")
    assert great.name == "keyword:great,love it"
    assert votes(great, ["GREAT phone", "greatly overpriced", "I love it.", "I love itemised bills", None, "meh"]) == \
        ["positive", None, "positive", None, None, None]
    both = lf("keyword", words=["battery", "dies"], label="negative", mode="all")
    assert votes(both, ["battery dies fast", "battery is fine", "it dies"]) == ["negative", None, None]
    exact = lf("keyword", words=["OK"], label="positive", case_sensitive=True)
    assert votes(exact, ["OK then", "ok then"]) == ["positive", None]
    body = lf("keyword", words=["refund"], label="negative", column="body")
    assert votes(body, ["want a refund"], column="body") == ["negative"]


def test_rule_options_are_checked_with_one_line_messages():
    with pytest.raises(LabelerError, match="needs the option 'label'"):
        lf("keyword", words=["x"])
    with pytest.raises(LabelerError, match="'neutral' is not one of the pipeline's classes"):
        lf("keyword", words=["x"], label="neutral")
    with pytest.raises(LabelerError, match=r"option 'lable': unknown option .*takes: .*label"):
        lf("keyword", words=["x"], label="positive", lable="x")
    with pytest.raises(LabelerError, match="not a valid regular expression"):
        lf("regex", pattern="(unclosed", label="negative")
    with pytest.raises(LabelerError, match="'mode' must be 'any' or 'all'"):
        lf("keyword", words=["x"], label="positive", mode="most")


def test_a_row_without_the_text_column_raises_naming_the_columns_it_has():
    with pytest.raises(LabelerError, match=r"row has no column 'text' \(it has: body, id\)"):
        lf("keyword", words=["x"], label="positive").vote([{"body": "x", "id": 1}])


def test_regex_and_lookup():
    rx = lf("regex", pattern=r"\brefund(ed)?\b|money back", label="negative")
    assert votes(rx, ["I was refunded", "Money back please", "money back please", "refunds"]) == ["negative", None, "negative", None]
    assert votes(lf("regex", pattern="money back", label="negative", ignore_case=True), ["MONEY BACK"]) == ["negative"]
    look = lf("lookup", column="source", map={"spam-trap": "negative", 5: "positive"}, default=None)
    assert look.vote([{"source": "spam-trap"}, {"source": 5}, {"source": "5"}, {"source": "other"}, {"source": None}]) == \
        ["negative", "positive", "positive", None, None]


def test_python_functions_from_a_module_or_a_file_per_row_or_batched(tmp_path):
    (tmp_path / "my_rules.py").write_text("def short(row):\n    return 'negative' if len(row['text']) < 5 else None\n")
    (tmp_path / "lfs").mkdir()
    (tmp_path / "lfs" / "batch.py").write_text(textwrap.dedent("""
        def stars(rows):
            return ['positive' if r.get('stars', 0) >= 4 else None for r in rows]
    """))
    short = lf("python", tmp_path, function="my_rules:short")
    assert short.name == "python:short"
    assert votes(short, ["bad", "a long review"]) == ["negative", None]
    stars = lf("python", tmp_path, function="lfs/batch.py:stars", batch=True)
    assert stars.vote([{"stars": 5}, {"stars": 1}, {}]) == ["positive", None, None]
    with pytest.raises(LabelerError, match="has no function 'nope'"):
        lf("python", tmp_path, function="my_rules:nope")
    with pytest.raises(LabelerError, match="no file"):
        lf("python", tmp_path, function="missing.py:f")
    with pytest.raises(LabelerError, match="cannot import 'no_such_module_xyz'"):
        lf("python", tmp_path, function="no_such_module_xyz:f")


def test_failing_rows_are_recorded_by_position_and_count_as_abstains(tmp_path):
    (tmp_path / "flaky.py").write_text(textwrap.dedent("""
        def flaky(row):
            if row['text'] == 'boom':
                raise ValueError('cannot read this one')
            return 'maybe' if row['text'] == 'odd' else 'positive'
    """))
    fn = lf("python", tmp_path, function="flaky.py:flaky")
    batch = Batch([3, 4, 7, 9], [{"text": "fine"}, {"text": "boom"}, {"text": "odd"}, {"text": "ok"}])
    col, errors, n_err = apply(fn, batch, {"negative": 0, "positive": 1})
    assert col == [1, -1, -1, 1] and n_err == 2
    assert errors[0] == (4, "ValueError: cannot read this one")
    assert errors[1][0] == 7 and "voted 'maybe', which is not a class" in errors[1][1]


def test_vote_batch_builds_an_int8_matrix_in_entry_order(tmp_path):
    ctx = LabelContext(CLASSES, "text", str(tmp_path))
    specs = (LFSpec("keyword", {"words": ["great"], "label": "positive"}, "a"), LFSpec("regex", {"pattern": "awful", "label": "negative"}, "b"))
    out = vote_batch(specs, ctx, Batch([0, 1, 2], [{"text": "great"}, {"text": "awful"}, {"text": "great, awful"}]))
    assert out.matrix.dtype == np.int8
    assert out.matrix.tolist() == [[1, -1], [-1, 0], [1, 0]]
    assert out.error_counts == [0, 0]


def _tiny_classifier(path):
    """A 1-layer BERT text classifier with a word-level tokenizer, built locally (nothing downloaded)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "great", "terrible", "the", "is", "movie", "fine", "awful"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=3, initializer_range=1.0,
                     id2label={0: "NEG", 1: "POS", 2: "OTHER"}, label2id={"NEG": 0, "POS": 1, "OTHER": 2})
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model, fast


@pytest.mark.slow
def test_model_labeler_votes_what_the_local_model_predicts(tmp_path):
    import torch

    model, tok = _tiny_classifier(tmp_path / "clf")
    texts = ["great movie", "terrible", "the movie is fine", "awful awful", "great great great", "is the", "movie", "fine"]
    with torch.no_grad():
        enc = tok(texts, return_tensors="pt", padding=True)
        probs = model(**enc).logits.softmax(-1)
    best, score = probs.argmax(-1).tolist(), probs.max(-1).values.tolist()
    labels = ["NEG", "POS", "OTHER"]
    assert len(set(best)) > 1  # the test means something only if the model does not say one thing

    mapping = {"NEG": "negative", "POS": "positive"}  # OTHER is not mapped: abstain
    fn = lf("model", tmp_path, path="clf", map=mapping, batch_size=3)
    assert fn.name == "model:clf" and fn.in_driver is True
    got = votes(fn, texts)
    assert got == [mapping.get(labels[b]) for b in best]

    cut = sorted(score)[len(score) // 2]
    picky = lf("model", tmp_path, path="clf", map=mapping, min_score=cut)
    assert votes(picky, texts) == [mapping.get(labels[b]) if s >= cut else None for b, s in zip(best, score)]
    assert votes(picky, [None, ""]) == [None, None]


def test_model_labeler_never_downloads_and_checks_its_map(tmp_path):
    with pytest.raises(LabelerError, match="not a local model directory .* never downloads"):
        lf("model", tmp_path, path="bert-base-uncased")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(LabelerError, match=r"map\['LABEL_2'\]: 'neutral' is not one of the pipeline's classes"):
        lf("model", tmp_path, path="m", map={"LABEL_2": "neutral"})

"""The share of each task's gain that the merged adapter keeps, as `fmhub run` prints it under its scores table."""

from __future__ import annotations

import pytest

from fmhub.api.run import _kept


def test_kept_is_the_merged_share_of_the_best_adapters_gain_over_the_base():
    tasks = [("sentiment", "accuracy", True), ("tickets", "accuracy", True), ("lm", "loss", False)]
    rows = [("tiny", "base model", {"sentiment": 0.6, "tickets": 0.5, "lm": 3.0}),
            ("a", "adapter", {"sentiment": 1.0, "tickets": 0.4, "lm": 2.0}),
            ("b", "adapter", {"sentiment": 0.3, "tickets": 0.9, "lm": 2.5}),
            ("merged", "merged adapter", {"sentiment": 0.9, "tickets": 0.5, "lm": 2.5})]
    kept = _kept(tasks, rows)
    assert kept["sentiment"] == pytest.approx(0.75) and kept["tickets"] == pytest.approx(0.0)
    assert kept["lm"] == pytest.approx(0.5)  # lower is better: (3.0 - 2.5) / (3.0 - 2.0)


def test_no_share_without_a_merged_score_or_an_adapter_that_beat_the_base():
    tasks = [("t", "accuracy", True)]
    assert _kept(tasks, [("tiny", "base model", {"t": 0.6}), ("a", "adapter", {"t": 0.5}),
                         ("merged", "merged adapter", {"t": 0.6})]) == {}
    assert _kept(tasks, [("tiny", "base model", {"t": 0.6}), ("a", "adapter", {"t": 0.9})]) == {}

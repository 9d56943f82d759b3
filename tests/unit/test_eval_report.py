"""fmhub.ml.eval_report: slice and comparison charts, and the self-contained HTML page."""

from __future__ import annotations

import base64
import copy
import json
import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from fmhub.ml import eval_report as er  # noqa: E402
from tests.helpers import REPO_ROOT  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = REPO_ROOT


def _report(compare: bool = True, **over) -> dict:
    rep = {
        "v": 1, "eval": "sentiment", "task": "sentiment", "metric": "accuracy", "higher_is_better": True,
        "model": "models/base", "adapter": None, "rev": "abc123def4567890", "rows": 240,
        "overall": {"n": 240, "value": 0.81, "stderr": 0.025},
        "slices": [
            {"name": "toys", "kind": "where", "description": "toy brands", "n": 40, "value": 0.30, "stderr": 0.07,
             "gap": -0.51, "flagged": True},
            {"name": "books", "kind": "where", "description": "book titles", "n": 80, "value": 0.90, "stderr": 0.03,
             "gap": 0.09, "flagged": False},
            {"name": "short", "kind": "regex", "description": "under 20 chars", "n": 120, "value": 0.85, "stderr": 0.03,
             "gap": 0.04, "flagged": False},
        ],
        "compare": None,
    }
    if compare:
        rep["compare"] = {
            "old": {"label": "HEAD~1", "model": "models/base", "rev": "0ld0ld"},
            "new": {"label": "work tree", "model": "models/base", "rev": None},
            "threshold": 0.02,
            "rows": [
                {"slice": "(all)", "n_old": 240, "n_new": 240, "old": 0.80, "new": 0.85, "delta": 0.05, "verdict": "better"},
                {"slice": "toys", "n_old": 40, "n_new": 40, "old": 0.35, "new": 0.30, "delta": -0.05, "verdict": "worse"},
                {"slice": "books", "n_old": 80, "n_new": 80, "old": 0.90, "new": 0.90, "delta": 0.0, "verdict": "same"},
                {"slice": "short", "n_old": 120, "n_new": 120, "old": 0.95, "new": 0.85, "delta": -0.10, "verdict": "worse"},
            ],
        }
    rep.update(over)
    return json.loads(json.dumps(rep))  # what the CLI will hand over: a report read back from JSON


def _png(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    img = imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    return img


def _near(img: np.ndarray, colour: str, tol: float = 0.03) -> int:
    """How many pixels are (almost) exactly ``colour``."""
    want = np.array(to_rgba(colour)[:3])
    return int((np.abs(img[..., :3] - want) < tol).all(-1).sum())


def _bar_colours(fig) -> list[tuple]:
    return [tuple(round(c, 3) for c in p.get_facecolor()) for p in fig.axes[0].patches]


def _rgba(colour: str) -> tuple:
    return tuple(round(c, 3) for c in to_rgba(colour))


# ---------------------------------------------------------------- slice chart


def test_plot_slices_writes_a_real_png(tmp_path):
    path = str(tmp_path / "slices.png")
    assert er.plot_slices(_report(), path) == path
    img = _png(path)
    h, w = img.shape[:2]
    assert w > h  # four bars: a wide chart
    assert img[..., :3].std() > 0.05  # not a blank canvas
    assert _near(img, er.SLICE_COLOUR) > 1000 and _near(img, er.OVERALL_COLOUR) > 1000


def test_flagged_slice_has_its_own_colour(tmp_path):
    fig = er._slices_figure(_report())
    colours = _bar_colours(fig)
    assert colours[0] == _rgba(er.OVERALL_COLOUR)
    assert colours[1] == _rgba(er.FLAGGED_COLOUR)  # toys
    assert colours[2] == colours[3] == _rgba(er.SLICE_COLOUR)
    assert colours[1] != colours[2]
    # and in the pixels: red only where a slice is flagged
    flagged, clean = str(tmp_path / "f.png"), str(tmp_path / "c.png")
    er.plot_slices(_report(), flagged)
    rep = _report()
    for s in rep["slices"]:
        s["flagged"] = False
    er.plot_slices(rep, clean)
    assert _near(_png(flagged), er.FLAGGED_COLOUR) > 1000
    assert _near(_png(clean), er.FLAGGED_COLOUR) == 0


def test_slice_chart_shows_sizes_overall_line_and_title():
    fig = er._slices_figure(_report())
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["(all) (n=240)", "toys (n=40)", "books (n=80)", "short (n=120)"]
    assert any(list(line.get_xdata()) == [0.81, 0.81] for line in ax.get_lines())  # the overall value
    assert "sentiment" in ax.get_title() and "accuracy" in ax.get_title() and "models/base" in ax.get_title()
    # error bars: one per bar with a finite stderr
    assert len(ax.collections) == 1 and len(ax.collections[0].get_segments()) == 4


def test_zero_slices_draws_just_the_overall(tmp_path):
    rep = _report(compare=False, slices=[])
    fig = er._slices_figure(rep)
    assert len(fig.axes[0].patches) == 1
    paths = er.write_all(rep, str(tmp_path))
    _png(paths["slices_png"])
    page = Path(paths["html"]).read_text()
    assert "No slices declared" in page and "0.810" in page


def test_empty_slice_and_nan_stderr(tmp_path):
    rep = _report(compare=False)
    rep["slices"].append({"name": "empty", "kind": "where", "description": "nothing matched", "n": 0,
                          "value": None, "stderr": None, "gap": None, "flagged": False})
    rep["slices"][1]["stderr"] = float("nan")
    rep["overall"]["stderr"] = float("nan")
    rep = json.loads(json.dumps(rep))  # NaN survives the JSON round trip as NaN
    assert math.isnan(rep["slices"][1]["stderr"])
    fig = er._slices_figure(rep)
    ax = fig.axes[0]
    assert len(ax.patches) == 4  # overall + 3 slices with rows; the empty one has no bar
    assert len(ax.collections[0].get_segments()) == 2  # only toys and short have a finite stderr
    assert any(t.get_text() == "no rows" for t in ax.texts)
    paths = er.write_all(rep, str(tmp_path))
    _png(paths["slices_png"])
    page = Path(paths["html"]).read_text()
    row = re.search(r"<tr><td>empty</td>.*?</tr>", page).group(0)
    assert row.count("—") == 3  # value, stderr, gap
    books = re.search(r"<tr><td>books</td>.*?</tr>", page).group(0)
    assert "—" in books and "nan" not in books.lower()


def test_sixty_slices_grow_the_figure(tmp_path):
    rep = _report(compare=False)
    rep["slices"] = [dict(rep["slices"][0], name=f"slice {i}", flagged=i % 10 == 0) for i in range(60)]
    path = str(tmp_path / "many.png")
    er.plot_slices(rep, path)
    h, w = _png(path).shape[:2]
    small = str(tmp_path / "few.png")
    er.plot_slices(_report(), small)
    assert h > w and h > 3 * _png(small).shape[0]
    assert len(er._slices_figure(rep).axes[0].get_yticklabels()) == 61


def test_long_names_and_dollar_signs_are_drawn_literally(tmp_path):
    rep = _report(compare=False)
    rep["slices"][0]["name"] = "a very long slice name " * 10
    rep["slices"][1]["name"] = "price $5-$10"  # would be mathtext if left as is
    rep["model"] = "models/$x$"
    fig = er._slices_figure(rep)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels[1]) < 70 and labels[1].endswith("… (n=40)")
    assert labels[2] == r"price \$5-\$10 (n=80)"
    path = str(tmp_path / "s.png")
    er.plot_slices(rep, path)  # draws without a mathtext error
    _png(path)


# ---------------------------------------------------------------- comparison chart


def test_plot_compare_png_and_verdict_colours(tmp_path):
    path = str(tmp_path / "compare.png")
    assert er.plot_compare(_report(), path) == path
    img = _png(path)
    assert _near(img, er.VERDICT_COLOURS["worse"]) > 500 and _near(img, er.VERDICT_COLOURS["better"]) > 500
    colours = _bar_colours(er._compare_figure(_report()))
    old, new = colours[0::2], colours[1::2]
    assert set(old) == {_rgba(er.OLD_COLOUR)}
    assert new == [_rgba(er.VERDICT_COLOURS[v]) for v in ("better", "worse", "same", "worse")]
    texts = [t.get_text() for t in er._compare_figure(_report()).axes[0].texts]
    assert "-0.100 worse" in texts and "+0.050 better" in texts


def test_compare_colours_follow_the_verdict_for_loss():
    rep = _report(metric="loss", higher_is_better=False)
    rep["compare"]["rows"] = [
        {"slice": "(all)", "n_old": 240, "n_new": 240, "old": 2.0, "new": 1.5, "delta": -0.5, "verdict": "better"},
        {"slice": "toys", "n_old": 40, "n_new": 40, "old": 2.0, "new": 2.6, "delta": 0.6, "verdict": "worse"},
    ]
    new = _bar_colours(er._compare_figure(rep))[1::2]
    assert new == [_rgba(er.VERDICT_COLOURS["better"]), _rgba(er.VERDICT_COLOURS["worse"])]
    assert "lower is better" in er._compare_figure(rep).axes[0].get_xlabel()


def test_compare_edge_cases(tmp_path):
    rep = _report()
    rep["compare"]["rows"].append({"slice": "gone", "n_old": 12, "n_new": 0, "old": 0.5, "new": None, "delta": None,
                                   "verdict": "same"})
    fig = er._compare_figure(rep)
    assert len(fig.axes[0].patches) == 9  # 4 rows × 2 bars, and only the old bar for "gone"
    assert "gone (n=12→0)" in [t.get_text() for t in fig.axes[0].get_yticklabels()]
    rep["compare"]["rows"] = []
    er.plot_compare(rep, str(tmp_path / "empty.png"))
    _png(str(tmp_path / "empty.png"))
    with pytest.raises(ValueError):
        er.plot_compare(_report(compare=False), str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


# ---------------------------------------------------------------- HTML


def test_html_escapes_every_report_string(tmp_path):
    rep = _report(eval="<i>ev</i>", model="models/<m>")
    rep["slices"][0]["name"] = "<b>x</b>"
    rep["slices"][0]["description"] = "<script>alert('d')</script>"
    rep["slices"][1]["kind"] = "<u>kind</u>"
    rep["compare"]["rows"][1]["slice"] = "<b>x</b>"
    rep["compare"]["old"]["label"] = "<em>old</em>"
    path = er.write_html(rep, str(tmp_path / "r.html"), {})
    page = Path(path).read_text()
    for raw in ("<b>x</b>", "<script>", "<i>ev</i>", "<m>", "<u>kind</u>", "<em>old</em>"):
        assert raw not in page
        assert raw.replace("<", "&lt;").replace(">", "&gt;") in page
    assert page.count("&lt;b&gt;x&lt;/b&gt;") == 2  # the slice table and the comparison table


def test_html_regression_table_is_worst_first():
    page = er.render_html(_report(), {})
    table = page.split("<h2>Comparison")[1]
    order = re.findall(r"<tr><td>([^<]*)</td>", table)
    assert order == ["short", "toys", "books", "(all)"]  # biggest drop first, improvements last
    assert "2 slice(s) worse" in page
    # lower is better: the biggest rise in loss is the worst
    rep = _report(metric="loss", higher_is_better=False)
    rep["compare"]["rows"] = [
        {"slice": "(all)", "n_old": 9, "n_new": 9, "old": 2.0, "new": 1.5, "delta": -0.5, "verdict": "better"},
        {"slice": "a", "n_old": 9, "n_new": 9, "old": 2.0, "new": 2.1, "delta": 0.1, "verdict": "worse"},
        {"slice": "b", "n_old": 9, "n_new": 9, "old": 2.0, "new": 2.9, "delta": 0.9, "verdict": "worse"},
        {"slice": "c", "n_old": 0, "n_new": 0, "old": None, "new": None, "delta": None, "verdict": "same"},
        {"slice": "d", "n_old": 9, "n_new": 9, "old": 2.0, "new": 2.0, "delta": 0.0, "verdict": "same"},
    ]
    table = er.render_html(rep, {}).split("<h2>Comparison")[1]
    assert re.findall(r"<tr><td>([^<]*)</td>", table) == ["b", "a", "d", "c", "(all)"]
    assert "lower is better" in er.render_html(rep, {})


def test_html_slice_table_and_flag_marker():
    page = er.render_html(_report(compare=False), {})
    toys = re.search(r"<tr class=flagged><td>toys</td>.*?</tr>", page).group(0)
    assert "⚑" in toys and "0.300" in toys and "0.070" in toys and "-0.510" in toys and ">40<" in toys
    books = re.search(r"<tr><td>books</td>.*?</tr>", page).group(0)
    assert "⚑" not in books and "+0.090" in books
    assert "<h2>Comparison" not in page and "<th>rest</th>" not in page
    rep = _report(compare=False)
    for s, rest in zip(rep["slices"], (0.9, 0.8, None)):
        s["rest"] = rest  # fmhub.ml.slices.metrics adds the value on the other rows
    page = er.render_html(rep, {})
    assert "<th>rest</th>" in page
    assert "<td class=n>0.900</td><td class=flag>⚑" in page


def test_html_comparison_with_labels_only():
    rep = _report()
    rep["compare"]["old"] = {"label": "HEAD~1"}  # what fmhub eval --compare gives: no model or rev
    rep["compare"]["new"] = {"label": "this run"}
    page = er.render_html(rep, {})
    assert "old <b>HEAD~1</b> → new <b>this run</b>;" in page
    fig = er._compare_figure(rep)  # labels alone are enough for the chart too
    assert "HEAD~1 → this run" in fig.axes[0].get_title()


def test_html_embeds_images_and_needs_nothing_else(tmp_path):
    paths = er.write_all(_report(), str(tmp_path))
    page = Path(paths["html"]).read_text()
    uris = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(uris) == 2
    for uri, png in zip(uris, (paths["slices_png"], paths["compare_png"])):
        data = base64.b64decode(uri, validate=True)
        assert data[:8] == PNG_MAGIC and data == Path(png).read_bytes()
    assert not re.search(r"<(script|link)\b|https?://|src='(?!data:)", page)


# ---------------------------------------------------------------- write_all


def test_write_all_paths_and_no_temp_files(tmp_path):
    out = tmp_path / "a" / "b"  # created when missing
    paths = er.write_all(_report(), str(out))
    assert set(paths) == {"slices_png", "compare_png", "html"}
    assert all(os.path.exists(p) and os.path.dirname(p) == str(out) for p in paths.values())
    assert sorted(os.listdir(out)) == ["compare.png", "report.html", "slices.png"]
    # again without a comparison: no compare key, and no stale compare.png beside a page that does not show it
    paths = er.write_all(_report(compare=False), str(out))
    assert set(paths) == {"slices_png", "html"}
    assert sorted(os.listdir(out)) == ["report.html", "slices.png"]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    good = er.write_all(_report(), str(tmp_path))
    before = Path(good["html"]).read_bytes()
    with pytest.raises(FileNotFoundError):
        er.write_html(_report(), good["html"], {"missing": str(tmp_path / "nope.png")})
    assert Path(good["html"]).read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_charts_from_threads(tmp_path):
    errors: list[BaseException] = []

    def draw(i: int) -> None:
        try:
            rep = copy.deepcopy(_report())
            rep["eval"] = f"e{i}"
            er.write_all(rep, str(tmp_path / str(i)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=draw, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(3):
        _png(str(tmp_path / str(i) / "slices.png"))
        _png(str(tmp_path / str(i) / "compare.png"))


def test_matplotlib_is_lazy_and_pyplot_never_used(tmp_path):
    code = (
        "import sys, json\n"
        "import fmhub.ml.eval_report as er\n"
        "assert 'matplotlib' not in sys.modules, 'imported at module load'\n"
        f"er.write_all(json.loads(sys.argv[1]), {str(tmp_path)!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(_report())], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "report.html").exists()

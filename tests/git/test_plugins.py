"""The plugin host: built-ins arrive through entry points; the guard rails (a third-party package: test_plugin_example.py)."""

from __future__ import annotations

import json

import pytest

from fmhub.base.errors import PluginError
from fmhub.plugin import checks, host, report


def test_builtins_register_through_entry_points():
    pm = host.new_plugin_manager()
    names = {name for name, _ in pm.list_name_plugin()}
    assert {"safetensors", "merge-basic"} <= names
    dists = {pm.get_name(p): d.project_name for p, d in pm.list_plugin_distinfo()}
    assert dists["safetensors"] == "fmhub"
    assert set(host.registry("merge-strategy", pm)) >= {"ours", "theirs"}
    assert host.registry("format", pm)["safetensors"].name == "safetensors"
    assert set(host.registry("serving-backend", pm)) >= {"local", "vllm"}


def test_without_entry_points_nothing_is_loaded():
    pm = host.new_plugin_manager(load_entry_points=False)
    assert host.registry("format", pm) == {}
    with pytest.raises(PluginError, match="no format named 'safetensors'"):
        host.lookup("format", "safetensors", pm)


def plugin_of(hook: str, *objs: object) -> object:
    """A plugin registered by hand whose ``hook`` returns ``objs``."""
    from fmhub import hookimpl

    return type("HandPlugin", (), {hook: hookimpl(lambda self: list(objs))})()


class Ours:
    name = "ours"

    def merge(self, name, base, load, sides, options):
        return 0


def test_a_clash_is_listed_and_refused_only_where_the_name_is_used():
    pm = host.new_plugin_manager()
    pm.register(plugin_of("fmhub_merge_strategies", Ours()), name="dup")
    strategies = host.registry("merge-strategy", pm)
    assert "ours" in strategies and "theirs" in strategies  # listing never raises
    assert {p.plugin for p in strategies.clashes()["ours"]} == {"dup", "merge-basic"}
    with pytest.raises(PluginError, match=r"two plugins provide the merge-strategy 'ours': .*'dup'.*fmhub uses neither"):
        host.lookup("merge-strategy", "ours", pm)
    with pytest.raises(PluginError, match="two plugins provide the merge-strategy 'ours'"):
        strategies.values()  # using them all uses 'ours'
    assert host.lookup("merge-strategy", "theirs", pm).name == "theirs"  # other names work
    assert strategies.get("theirs").name == "theirs"


def test_kinds_come_from_the_hookspecs_and_name_complete_protocols():
    from fmhub.plugin import hookspecs

    assert host.KINDS == {h: getattr(hookspecs, h).fmhub_kind for h in host.HOOKS if hasattr(getattr(hookspecs, h), "fmhub_kind")}
    assert set(host.KINDS.values()) == {"format", "data-format", "delta-codec", "merge-strategy", "cleaner", "labeler",
                                        "data-backend", "access-policy", "serving-backend"}
    assert "fmhub_fisher_diagonal" in host.HOOKS and "fmhub_fisher_diagonal" not in host.KINDS
    for kind in host.KINDS.values():
        proto = checks.protocol(kind)
        assert proto is not None and "name" in checks.members(proto), kind


def test_every_built_in_object_satisfies_its_protocol():
    pm = host.new_plugin_manager()
    for p in host.provided(pm):
        assert checks.problem(p.obj, p.kind) is None, (p.kind, p.name)
        assert isinstance(p.obj, checks.protocol(p.kind)), (p.kind, p.name)
    assert not pm.failures


def test_an_unknown_hook_is_refused_at_registration_naming_it():
    from fmhub import hookimpl

    pm = host.new_plugin_manager(load_entry_points=False)
    with pytest.raises(PluginError, match=r"^fmhub_merge_strategys is not an fmhub hook \(did you mean fmhub_merge_strategies\?\)"):
        pm.register(plugin_of("fmhub_merge_strategys", Ours()), name="typo")
    assert pm.get_plugin("typo") is None

    class Unmarked:
        def fmhub_merge_strategies(self):
            return [Ours()]

    with pytest.raises(PluginError, match="fmhub_merge_strategies is not marked as a hook implementation"):
        pm.register(Unmarked(), name="unmarked")

    class Optional:
        @hookimpl(optionalhook=True)
        def fmhub_from_a_newer_fmhub(self):
            return []

    assert pm.register(Optional(), name="optional") == "optional"  # pluggy's optionalhook: a hook this fmhub lacks


def test_an_object_is_checked_against_its_protocol_when_used():
    class NoMerge:
        name = "no-merge"

    class BadScope:
        name = "bad-scope"
        scope = "rows"

        def configure(self, options, context):
            return None

    pm = host.new_plugin_manager()
    pm.register(plugin_of("fmhub_merge_strategies", NoMerge()), name="half")
    pm.register(plugin_of("fmhub_cleaners", BadScope()), name="scoped")
    assert "no-merge" in host.registry("merge-strategy", pm)
    with pytest.raises(PluginError, match=r"plugin 'half': the merge-strategy 'no-merge' has no method merge\(\); "
                                          r"see fmhub.plugin.interfaces.MergeStrategy"):
        host.lookup("merge-strategy", "no-merge", pm)
    assert host.lookup("merge-strategy", "ours", pm).name == "ours"
    with pytest.raises(PluginError, match="has scope 'rows'; a cleaner's scope is 'row' or 'dataset'"):
        host.lookup("cleaner", "bad-scope", pm)


def test_an_object_without_a_name_is_left_out_with_a_warning(capsys, monkeypatch):
    monkeypatch.setattr(checks, "_warned", set())
    monkeypatch.delenv("_FMHUB_PLUGINS_WARNED", raising=False)

    class Nameless:
        def merge(self, name, base, load, sides, options):
            return 0

    pm = host.new_plugin_manager()
    pm.register(plugin_of("fmhub_merge_strategies", Nameless()), name="nameless")
    assert "ours" in host.registry("merge-strategy", pm)
    assert capsys.readouterr().err == ("fmhub: warning: plugin 'nameless': fmhub_merge_strategies() returned a merge-strategy "
                                       "with no name (Nameless); every merge-strategy needs a unique `name`; skipped it "
                                       "(fix or uninstall that package, or set FMHUB_DISABLE_PLUGINS=nameless)\n")
    monkeypatch.setattr(checks, "STRICT", True)
    with pytest.raises(PluginError, match="plugin 'nameless': .* with no name"):
        host.registry("merge-strategy", pm)


def test_disabled_plugins_are_blocked_built_ins_too(monkeypatch):
    monkeypatch.setenv("FMHUB_DISABLE_PLUGINS", " merge-basic ,no-such-plugin")
    assert host.disabled() == ("merge-basic", "no-such-plugin")
    pm = host.new_plugin_manager()
    assert pm.is_blocked("merge-basic") and "ours" not in host.registry("merge-strategy", pm)
    assert "linear" in host.registry("merge-strategy", pm)
    assert {p.plugin for p in host._built_in_only(["fmhub_merge_strategies"])} == {
        "merge-linear", "merge-ties-dare", "merge-fisher", "merge-slerp"}  # the filter's direct calls obey it too
    info = report.describe(pm)
    assert info.disabled == ("merge-basic", "no-such-plugin")
    assert {p.name: p.status for p in info.plugins}["merge-basic"] == "disabled"


def test_describe_reports_plugins_objects_and_clashes():
    pm = host.new_plugin_manager()
    pm.register(plugin_of("fmhub_merge_strategies", Ours()), name="dup")
    info = report.describe(pm)
    assert {p.name: (p.package, p.status, p.builtin) for p in info.plugins}["safetensors"] == ("fmhub", "loaded", True)
    assert {p.name: p.status for p in info.plugins}["dup"] == "registered"
    assert info.clashes == [report.Clash("merge-strategy", "ours", ("dup", "merge-basic"))]
    items = {(i.kind, i.name, i.plugin): i for i in info.provided}
    assert items[("merge-strategy", "ours", "merge-basic")].problem == "clash: also provided by dup"
    assert items[("format", "safetensors", "safetensors")] == report.Item("format", "safetensors", "safetensors", "fmhub", "")
    assert json.loads(json.dumps(info.as_dict()))["clashes"] == [{"kind": "merge-strategy", "name": "ours", "plugins": ["dup", "merge-basic"]}]


# -- the options helper -----------------------------------------------------------------------------


def test_text_of_has_one_rule_for_cleaners_and_labelers():
    from fmhub.plugin.interfaces import Drop
    from fmhub.plugin.options import OptionError, row_text, text_of

    assert text_of({"text": "a"}, "text") == text_of({"text": "a"}, ["text"]) == "a"
    assert text_of({"text": None}, ["text"]) == ""  # null is empty text
    assert text_of({"t": "a", "b": None, "c": "c"}, ["t", "b", "c"]) == "a\nc"
    assert text_of({"body": "x"}, ["text"]) == Drop("no column 'text'", {"column": "text"})
    assert text_of({"text": 3}, ["text"]).reason == "column 'text' holds int, not text"
    assert row_text({"text": None}, "text") == ""
    with pytest.raises(OptionError, match=r"row has no column 'text' \(it has: body, id\)"):
        row_text({"body": "x", "id": 1}, "text")
    with pytest.raises(OptionError, match="row's column 'text' holds int, not text"):
        row_text({"text": 3}, "text")


def test_parse_options_names_the_option_for_cleaners_and_labelers():
    from typing import Optional

    from fmhub.plugin.interfaces import CleanContext, LabelContext
    from fmhub.plugin.options import ClassName, OptionError, Options, Words, parse_options

    class Opts(Options):
        words: Words
        label: Optional[ClassName] = None

    labels = LabelContext(("neg", "pos"))
    assert parse_options("kw", Opts, {"words": "a", "label": "pos"}, labels).words == ("a",)
    for options, context, message, option in [
        ({}, labels, "kw needs the option 'words'", "words"),
        ({"words": []}, labels, "kw: option 'words': must be a word or a list of words", "words"),
        ({"words": "a", "label": "meh"}, labels, "kw: option 'label': 'meh' is not one of the pipeline's classes (neg, pos)", "label"),
        ({"words": "a", "lable": 1}, labels, "kw: option 'lable': unknown option (a typo?); kw takes: words, label", "lable"),
        ({"words": "a", "lable": 1}, CleanContext(), "kw: option 'lable': unknown option (a typo?); kw takes: words, label, columns", "lable"),
    ]:
        with pytest.raises(OptionError) as exc:
            parse_options("kw", Opts, options, context)
        assert (str(exc.value), exc.value.option) == (message, option)
    from fmhub.data.clean import pipeline as clean_pipeline

    assert clean_pipeline.OptionError is OptionError  # one error for cleaners and labelers (a FmhubError: label catches those)

"""Built-in plugin: the ``python`` labeler, a labelling function written in Python.

``{function: "my_lfs:has_refund"}`` imports ``has_refund`` from the module
``my_lfs`` (found on ``sys.path`` or beside ``fmhub.yaml``);
``{function: "lfs/rules.py:has_refund"}`` loads it from a file, relative to
``fmhub.yaml``. The function gets one row (a dict) and returns a class name,
or ``None`` to abstain. With ``batch: true`` it gets a list of rows and
returns a list of votes, one per row, instead.

It runs in worker processes: the function must be importable there, which a
module-level function in a module or file is (a lambda typed in a notebook is
not).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Any, Callable, Mapping, Sequence

from fmhub import hookimpl
from fmhub.plugin.interfaces import LabelContext
from fmhub.plugin.options import OptionError, Options, parse_options


class _PythonLF:
    def __init__(self, name: str, fn: Callable, batch: bool) -> None:
        self.name, self._fn, self._batch = name, fn, batch

    def vote(self, rows: Sequence[Mapping[str, Any]]) -> Sequence[str | None]:
        if self._batch:
            return list(self._fn(list(rows)))
        return [self._fn(row) for row in rows]


class PythonOptions(Options):
    function: str
    batch: bool = False


class Python:
    name = "python"

    def configure(self, options: Mapping[str, Any], context: LabelContext) -> _PythonLF:
        o = parse_options(self.name, PythonOptions, options, context)
        ref = o.function
        return _PythonLF(f"python:{ref.rpartition(':')[2] or ref}", load_callable(ref, context.base_dir), o.batch)


def load_callable(ref: str, base_dir: str) -> Callable:
    """``module:name`` or ``path/to/file.py:name`` (relative to ``base_dir``) to the callable it names."""
    where, _, attr = ref.rpartition(":")
    if not where or not attr:
        raise OptionError(f"python: function {ref!r} must be 'module:function' or 'file.py:function'")
    if where.endswith(".py") or os.sep in where or "/" in where:
        module = _load_file(os.path.join(base_dir, where) if not os.path.isabs(where) else where, ref)
    else:
        if base_dir not in sys.path:
            sys.path.insert(0, base_dir)  # modules beside fmhub.yaml, as a script beside them would see
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise OptionError(f"python: cannot import {where!r} for {ref!r} ({exc}); is it on PYTHONPATH or beside fmhub.yaml?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise OptionError(f"python: {where!r} has no function {attr!r}")
    return fn


def _load_file(path: str, ref: str):
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise OptionError(f"python: {ref!r}: no file {path}")
    # one module per file, under a stable name, so each process loads it once and pickling can find it
    name = "fmhub_lf_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise OptionError(f"python: loading {path} failed: {type(exc).__name__}: {exc}") from None
    return module


@hookimpl
def fmhub_labelers():
    return [Python()]

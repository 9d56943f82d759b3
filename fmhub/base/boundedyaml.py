"""YAML from untrusted files, checked within bounds on the parser's event stream before any object is built.

Every YAML file fmhub reads may come from someone else's repository
(``fmhub.yaml`` of a clone, ``.fmhub/policy.yaml``, a merge recipe, a review's
overrides). Composing or loading one as it is costs whatever it asks for: a
"billion laughs" of aliases stands for billions of nodes in a few lines,
``[[[[…`` nested 100,000 deep makes the composer and every later walk recurse
(RecursionError, a traceback), ``2024-13-45`` or an unknown tag raise while an
object is built, a list as a key raises TypeError.

`check_bounds` walks the parser's events instead (the parser keeps its nesting
on a list, not the stack, so even 100,000 levels cost one pass), and refuses,
as one ``error`` line naming ``file:line``: files over a size, nesting over a
depth, too many nodes (an alias counts as all it stands for, or aliases are
refused), long values, merge keys, lists and mappings as keys, integers of more
than `MAX_INT_DIGITS` digits, non-finite numbers where the limits say so, and
any value that cannot be built. What passes composes and builds without
surprises.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from fmhub.base.boundedjson import MAX_INT_DIGITS
from fmhub.base.errors import FmhubError, printable

_MAX_INT_CHARS = 4 * MAX_INT_DIGITS + 16  # 10^40 written in binary, with a sign, prefix and a few `_`
MAX_MESSAGE = 1000  # an error quotes keys and values from the file: cut, so one line stays readable


@dataclass(frozen=True)
class YamlLimits:
    """What one kind of YAML file may hold; ``what`` names it in messages ("a policy", "a spec")."""

    max_bytes: int
    max_depth: int
    max_nodes: int
    max_value_chars: int
    aliases: bool = True  # allowed: each counts as every node it stands for (refused: one error naming the line)
    finite: bool = True  # refuse .inf and .nan
    what: str = "this file"
    nodes_hint: str = ""  # appended to the too-many-nodes message
    depth_hint: str = ""  # appended to the too-deep message


def at_line(path: str, line: Optional[int]) -> str:
    return f"{path}:{line}" if line else path


def one_line(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` as one terminal line: control characters escaped (a key may hold ``\\n`` or ``\\e[2J``), cut at ``limit``."""
    message = printable(message)  # tabs too: a YAML key quoted back stays one column-true line
    return message[:limit] + ("…" if len(message) > limit else "")


def yaml_error(path: str, exc: Exception, error: type[FmhubError]) -> FmhubError:
    """A parser's `yaml.YAMLError` as one ``error`` line naming the line it found the problem on."""
    mark = getattr(exc, "problem_mark", None)
    reason = getattr(exc, "problem", None) or getattr(exc, "reason", None) or "syntax error"
    return error(f"{at_line(path, mark.line + 1 if mark else None)}: not valid YAML: {reason}")


def read_text(path: str, limit: int, error: type[FmhubError], what: str = "this file") -> str:
    """A file's UTF-8 text, read within ``limit`` bytes; one ``error`` line when it is bigger, not a file, or not UTF-8.

    O_NONBLOCK: a FIFO (or a symlink to one, which git can check out) must not
    hang the read; a device such as /dev/zero never ends, so only regular files
    are read. ``OSError`` (FileNotFoundError included) is left to the caller.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{path}: not a regular file")
        data = f.read(limit + 1)  # never a whole multi-GB file into memory
    if len(data) > limit:
        raise error(f"{path}: larger than {what} may be ({limit} bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None


def check_bounds(text: str, path: str, limits: YamlLimits, error: type[FmhubError]) -> None:
    """Refuse what would make composing or building ``text`` costly or fail, as one ``error`` line naming ``path:line``."""
    if len(text) > limits.max_bytes:
        raise error(f"{path}: {len(text)} characters, more than {limits.what} may hold ({limits.max_bytes} bytes)")
    _Walk(path, limits, error).run(text)


@dataclass
class _Open:
    """A collection being read: whether its next node is a key (None: a sequence), its anchor, where it starts, how deep it goes."""

    next_is_key: Optional[bool]
    anchor: Optional[str]
    first: int  # the node count before it
    height: int = 1


class _Walk:
    """One pass over the parser's events, keeping only the open collections and the finished anchors' sizes."""

    def __init__(self, path: str, limits: YamlLimits, error: type[FmhubError]) -> None:
        self.path, self.limits, self.error = path, limits, error
        self.open: list[_Open] = []
        self.nodes = 0
        self.anchors: dict[str, tuple[int, int]] = {}  # a closed anchor -> (nodes it stands for, its height)
        self.defined: set[str] = set()  # every anchor so far, open ones included
        self.scalars = yaml.SafeLoader("")  # resolves and builds one scalar at a time

    def run(self, text: str) -> None:
        try:
            for event in yaml.parse(text, Loader=yaml.SafeLoader):
                if isinstance(event, yaml.CollectionEndEvent):
                    self._close()
                elif isinstance(event, yaml.NodeEvent):
                    self._node(event, at_line(self.path, event.start_mark.line + 1))
        except yaml.YAMLError as exc:
            raise yaml_error(self.path, exc, self.error) from None
        finally:
            self.scalars.dispose()

    def _node(self, event: Any, where: str) -> None:
        size, height = self._alias(event, where) if isinstance(event, yaml.AliasEvent) else self._anchor(event, where)
        self._count(size, where)
        parent = self.open[-1] if self.open else None
        is_key = parent is not None and parent.next_is_key is True
        if parent is not None and parent.next_is_key is not None:
            parent.next_is_key = not parent.next_is_key
        if isinstance(event, yaml.CollectionStartEvent):
            self._start(event, where, is_key)
            return
        if height and is_key:  # an alias of a list or mapping, as a key
            raise self.error(f"{where}: a key must be a plain value, not a list or mapping")
        if len(self.open) + height > self.limits.max_depth:
            raise self.error(f"{where}: nested deeper than {self.limits.max_depth} levels{self.limits.depth_hint}")
        if isinstance(event, yaml.ScalarEvent):
            self._scalar(event, where)
            if event.anchor is not None:
                self.anchors[event.anchor] = (1, 0)
        if parent is not None:
            parent.height = max(parent.height, height + 1)

    def _alias(self, event: Any, where: str) -> tuple[int, int]:
        if not self.limits.aliases:  # a few lines of aliases can stand for billions of nodes
            raise self.error(f"{where}: YAML aliases (*name) are not allowed in {self.limits.what}; write the value out")
        found = self.anchors.get(event.anchor)
        if found is None:  # unknown, or an anchor still open: `&a [*a]` is a loop every walk would follow forever
            raise self.error(f"{where}: *{event.anchor[:40]} names no anchor (&{event.anchor[:40]}) completed before it")
        return found

    def _anchor(self, event: Any, where: str) -> tuple[int, int]:
        """A node that is not an alias (one node, no height of its own yet); its anchor must be new, as the composer demands."""
        if event.anchor is not None:
            if event.anchor in self.defined:
                raise self.error(f"{where}: the anchor &{event.anchor[:40]} is defined twice")
            self.defined.add(event.anchor)
        return 1, 0

    def _count(self, size: int, where: str) -> None:
        self.nodes += size
        if self.nodes > self.limits.max_nodes:
            raise self.error(f"{where}: more than {self.limits.max_nodes} keys and values{self.limits.nodes_hint}")

    def _start(self, event: Any, where: str, is_key: bool) -> None:
        if is_key:
            raise self.error(f"{where}: a key must be a plain value, not a list or mapping")
        if len(self.open) >= self.limits.max_depth:
            raise self.error(f"{where}: nested deeper than {self.limits.max_depth} levels{self.limits.depth_hint}")
        mapping = isinstance(event, yaml.MappingStartEvent)
        self.open.append(_Open(True if mapping else None, event.anchor, self.nodes - 1))

    def _close(self) -> None:
        done = self.open.pop()
        if done.anchor is not None:
            self.anchors[done.anchor] = (self.nodes - done.first, done.height)
        if self.open:
            self.open[-1].height = max(self.open[-1].height, done.height + 1)

    def _scalar(self, event: Any, where: str) -> None:
        """A value as the loader will build it: short, an integer of at most 40 digits, a finite number, a real date."""
        limits = self.limits
        if len(event.value) > limits.max_value_chars:
            raise self.error(f"{where}: a value of {len(event.value)} characters (at most {limits.max_value_chars})")
        tag = event.tag if event.tag not in (None, "!") else self.scalars.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag == "tag:yaml.org,2002:merge":  # `<<:` copies another mapping in: an alias by another name
            raise self.error(f"{where}: YAML merge keys (<<) are not allowed in {limits.what}; write the keys out")
        if tag == "tag:yaml.org,2002:int" and len(event.value) > _MAX_INT_CHARS:  # before building: 1:59:59:… costs its square
            raise self.error(f"{where}: an integer of more than {MAX_INT_DIGITS} digits")
        value = self._build(event, tag, where)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** MAX_INT_DIGITS:
            raise self.error(f"{where}: an integer of more than {MAX_INT_DIGITS} digits")
        if limits.finite and isinstance(value, float) and not math.isfinite(value):
            raise self.error(f"{where}: {event.value[:20]} is not a finite number")

    def _build(self, event: Any, tag: str, where: str) -> Any:
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        try:
            return self.scalars.construct_object(node, deep=True)  # deep: `!!set` on a scalar fails only when finished
        except Exception as exc:  # an unknown tag, 2024-13-45, bad base64, `!!float ""` (IndexError): one scalar, any reason
            reason = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
            name = tag.replace("tag:yaml.org,2002:", "!!")[:40]
            raise self.error(f"{where}: not a valid {name} value ({reason[:200]})") from None


def safe_load(text: str, path: str, limits: YamlLimits, error: type[FmhubError]) -> Any:
    """`yaml.safe_load` of ``text`` once it is within ``limits``; every problem one ``error`` line naming ``path:line``.

    What the event walk cannot see (a tag no constructor builds on a list or
    mapping, ``!!omap`` on a mapping) still ends as one line, never a traceback.
    """
    check_bounds(text, path, limits, error)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise yaml_error(path, exc, error) from None


def load_file(path: str, limits: YamlLimits, error: type[FmhubError]) -> Any:
    """A YAML file read (`read_text`) and loaded (`safe_load`) within ``limits``; OSError is left to the caller."""
    return safe_load(read_text(path, limits.max_bytes, error, limits.what), path, limits, error)

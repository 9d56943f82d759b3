"""Access checks: every installed `AccessPolicy` asked at once, any deny wins.

What the rest of fmhub calls where bytes flow:

* `check_smudge` (the smudge filter, before any object is fetched or written):
  the file, then each tensor of a checkpoint; raises `AccessDenied`, or
  returns True when the deciding rules ask for a placeholder (the manifest
  text is written instead of the file);
* `read_denials` / `require_readable` (every other local reader of stored bytes:
  ``fmhub diff``, ``git diff``, ``fmhub extract`` and any ``REV:PATH`` read,
  the merge driver, ``fmhub hub push``, ``fmhub data-at``, ``fmhub serve``/
  ``fmhub eval`` materializing ``PATH@REV``): the same rule as smudge, tensor
  by tensor, with no placeholder to give instead;
* `check_unnamed` (an input with no path: ``fmhub filter-smudge`` or
  ``fmhub filter-clean`` without one): refused wherever a policy governs;
* `governs` (git's textconv, whose output git caches for every user of a
  clone): no statistics wherever a policy governs, for anyone;
* `check_columns` (``fmhub clean``/``fmhub label``, before any row is read);
* `pipeline_rows` (``fmhub clean``/``fmhub label``): a `RowGate` withholding
  the rows ``rows:`` rules keep from the user, as batches are read;
* `check_file_read` and `row_gate`: the same two for any reader, which
  `fmhub.governance.gate` (the one gate every pipeline reads through) calls;
* `check` (anything else);
* `decide` (the combined decision, nothing recorded): `fmhub.server.guard`
  and `fmhub.server.receive` on the server side, which keep each
  repository's own audit log.

Every deny, and every allow of a request some policy governs, is recorded in
the audit log (``what: access``). Messages say what was denied, by which rule
(``file:line``) and which role to ask for; they never quote restricted
content (tensor values, rows) nor name other users.

With no policy installed or no policy file, a check costs one ``stat``: the
policy list and the user's identity are looked up once per process, parsed
policies are cached by content.
"""

from __future__ import annotations

import functools
import os
import stat

from fmhub.base.errors import FmhubError
from fmhub.plugin.records import AccessRequest, Decision

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import Callable, Iterable, Optional, Sequence


USER_ENV = "FMHUB_USER"
MAX_READ = 16 << 20  # the most `work_tree_reader` reads of one file (a policy is far smaller; fmhub.governance.policy bounds it again)


class AccessDenied(FmhubError):
    """A policy denied an access; the message says what, by which rule, and which role would allow it."""

    def __init__(self, message: str, decision: Optional[Decision] = None) -> None:
        super().__init__(message)
        self.decision = decision


# -- who, and which policies ------------------------------------------------------------


def identity(cwd: Optional[str] = None) -> Optional[str]:
    """The acting user: ``FMHUB_USER``, else ``git config user.email``; None when neither is set (no roles)."""
    return os.environ.get(USER_ENV) or _git_email(os.path.abspath(cwd or "."))


@functools.lru_cache(maxsize=8)
def _git_email(cwd: str) -> Optional[str]:
    from fmhub.core.repo import (
        git,  # in git's filter process, a lookup in the config it has already read
    )

    try:
        return git("config", "user.email", cwd=cwd, check=False).strip() or None
    except (FmhubError, OSError):  # no git, or no such directory
        return None


@functools.lru_cache(maxsize=1)
def policies() -> tuple:
    """Every installed access policy (looked up once per process)."""
    from fmhub.plugin import host

    return tuple(host.registry("access-policy").values())


def work_tree_reader(root: str) -> Callable[[str], Optional[bytes]]:
    """``read_file`` for a local repository: the work tree's file, else the index's (a sparse or half-done checkout)."""

    def read(path: str) -> Optional[bytes]:
        # a policy that exists but cannot be read must fail closed: the NUL makes any parser refuse it
        try:  # O_NONBLOCK: a FIFO planted under the policy's name must not hang git's filter
            fd = os.open(os.path.join(root, path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return _index_blob(root, path)
        except OSError:
            return b"\0unreadable"
        try:
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # a device (/dev/zero) or FIFO: no end, or no data
                    return b"\0unreadable: not a regular file"
                data = f.read(MAX_READ + 1)  # never a whole multi-GB file into memory
        except OSError:
            return b"\0unreadable"
        return data if len(data) <= MAX_READ else b"\0unreadable: larger than MAX_READ"

    return read


@functools.lru_cache(maxsize=32)
def _index_blob(root: str, path: str) -> Optional[bytes]:
    from fmhub.core.repo import (
        staged_blob,  # in git's filter process, through the `git cat-file` it already runs
    )

    try:  # a staged policy too big to read must deny (the NUL fails any parser), not read as "no policy"
        return staged_blob(path, MAX_READ, cwd=root, too_big=b"\0unreadable: larger than MAX_READ")
    except (FmhubError, OSError):  # no git, or no such directory
        return None


# -- deciding -------------------------------------------------------------------------------


def decide(request: AccessRequest) -> tuple[Decision, bool]:
    """The combined decision, and whether any policy had an opinion (governed requests are recorded)."""
    allow: Optional[Decision] = None
    for policy in policies():
        d = policy.check(request)
        if d is None:
            continue
        if not d.allowed:
            return (d if d.policy else Decision(False, d.reason, d.roles, d.placeholder, d.where, policy.name)), True
        allow = allow or d
    return (allow or Decision(True)), allow is not None


def subject(request: AccessRequest) -> str:
    if request.tensor is not None:
        return f"tensor {request.tensor!r} of {request.path}"
    if request.column is not None:
        return f"column {request.column!r} of {request.path}"
    return request.path or request.repo


def denial_message(request: AccessRequest, d: Decision, what: Optional[str] = None) -> str:
    """One line: who may not do what, why (the rule's file:line), and which role to ask for; nothing restricted."""
    who = request.principal or "an unknown user (set FMHUB_USER or `git config user.email`)"
    msg = f"access denied: {who} may not {request.action} {what or subject(request)}"
    if d.reason:
        msg += f": {d.reason}"
    if d.where and d.where not in (d.reason or ""):
        msg += f" ({d.where})"
    if d.roles:
        msg += f"; ask a maintainer for role {' or '.join(repr(r) for r in d.roles)}"
    return msg


def record(request: AccessRequest, decision: Decision, details: Optional[dict] = None, cwd: Optional[str] = None) -> None:
    """Record one access decision in the audit log (``what: access``); never raises."""
    from fmhub.governance import audit

    info = {"action": request.action, "user": request.principal or "", "repo": request.repo}
    for key in ("tensor", "column", "oid"):
        if getattr(request, key) is not None:
            info[key] = getattr(request, key)
    if decision.where:
        info["rule"] = decision.where
    if decision.policy:
        info["policy"] = decision.policy
    info.update(details or {})
    try:
        audit.record("access", request.path or request.repo, "allow" if decision.allowed else "deny", info, cwd=cwd)
    except Exception:  # pragma: no cover - recording never stops the operation
        pass


def check(request: AccessRequest, cwd: Optional[str] = None, what: Optional[str] = None) -> Decision:
    """Decide ``request``; raise `AccessDenied` (recorded) on a deny, return the decision otherwise."""
    d, governed = decide(request)
    if not d.allowed:
        record(request, d, cwd=cwd)
        raise AccessDenied(denial_message(request, d, what), d)
    if governed:
        record(request, d, cwd=cwd)
    return d


def _local(root: Optional[str]) -> tuple[str, Optional[str], Callable[[str], Optional[bytes]]]:
    """The work tree, the user, and a reader that reads each file once for the requests of one check."""
    root = os.path.abspath(root or ".")
    return root, identity(root), functools.lru_cache(maxsize=8)(work_tree_reader(root))


def check_smudge(path: str, tensors: Iterable[str] = (), root: Optional[str] = None, action: str = "read") -> bool:
    """May the user materialize ``path`` (and each of its ``tensors``)? False: yes; True: only as a placeholder.

    Raises `AccessDenied` (naming the first denied tensor or column) when a
    deny does not allow a placeholder; with ``action="write"`` (the clean
    filter, ``git add``) every deny raises. ``root`` is the work tree (default:
    the current directory, where git runs filters).
    """
    if not policies():
        return False
    root, who, reader = _local(root)
    requests = [AccessRequest(who, action, root, path, read_file=reader)]
    requests += [AccessRequest(who, action, root, path, tensor=t, read_file=reader) for t in tensors]
    placeholder = False
    governed_allow: Optional[tuple[AccessRequest, Decision]] = None
    for req in requests:
        d, governed = decide(req)
        if not d.allowed:
            record(req, d, {"placeholder": d.placeholder}, cwd=root)
            if not d.placeholder or action != "read":
                done = "the file was not checked out" if action == "read" else "the file was not stored (git add refused)"
                raise AccessDenied(f"{path}: {denial_message(req, d)}; {done}", d)
            placeholder = True
        elif governed and governed_allow is None:
            governed_allow = (req, d)
    if governed_allow is not None and not placeholder:
        record(*governed_allow, cwd=root)  # one allow per file, not one per tensor
    return placeholder


def read_denials(path: str, tensors: Iterable[str] = (), root: Optional[str] = None, via: str = "") -> dict[str, AccessDenied]:
    """Checkout's read rule for a local reader of ``path``'s stored bytes (`fmhub diff`, `git diff`, ``REV:PATH``).

    Returns tensor name -> `AccessDenied` for each one the user may not read;
    empty when every one may be read. The file is asked first, as smudge asks:
    a denied file denies ``""`` (the file itself) and every tensor. A
    placeholder deny withholds like any other: a reader has no manifest text
    to hand over instead. Each deny is recorded as smudge records it (details:
    ``via``, the reader), and one allow per governed file. ``root``: any
    directory of the work tree.
    """
    if not policies():
        return {}
    root, who, reader = _local(_repo_root(os.path.abspath(root or ".")))  # from a subdirectory too
    details = {"via": via} if via else None
    names = list(tensors)
    file_req = AccessRequest(who, "read", root, path, read_file=reader)
    denied, allow = _read_decision(file_req, details, root)
    if denied is not None:
        return dict.fromkeys(["", *names], denied)
    out: dict[str, AccessDenied] = {}
    for name in names:
        denied, tensor_allow = _read_decision(AccessRequest(who, "read", root, path, tensor=name, read_file=reader), details, root)
        if denied is not None:
            out[name] = denied
        allow = allow or tensor_allow
    if allow is not None and not out:
        record(*allow, details, cwd=root)  # one allow per file, not one per tensor
    return out


def _read_decision(req: AccessRequest, details: Optional[dict], root: str) -> tuple[Optional[AccessDenied], Optional[tuple]]:
    """(the recorded denial, None) or (None, the governed allow to record, if any) for one request."""
    d, governed = decide(req)
    if not d.allowed:
        record(req, d, details, cwd=root)
        return AccessDenied(denial_message(req, d), d), None
    return None, ((req, d) if governed else None)


def require_readable(
    path: str, tensors: Iterable[str] = (), root: Optional[str] = None, via: str = "", outcome: str = "nothing was read"
) -> None:
    """`read_denials` for a reader that needs every one of them: raises the first denial, ``; outcome`` appended."""
    denied = read_denials(path, tensors, root, via)
    if denied:
        first = next(iter(denied.values()))
        raise AccessDenied(f"{first}; {outcome}", first.decision)


def check_unnamed(what: str, root: Optional[str] = None, via: str = "", action: str = "read") -> None:
    """Refuse ``what``, an input that names no path (`fmhub filter-smudge` or, ``action="write"``, `fmhub
    filter-clean` without one), whenever a policy governs the repository: the rules that apply depend on the
    path (fail closed)."""
    if not policies():
        return
    root, who, reader = _local(_repo_root(os.path.abspath(root or ".")))
    req = AccessRequest(who, action, root, None, read_file=reader)
    d, governed = decide(req)
    if d.allowed and not governed:
        return
    if d.allowed:  # an allow for "no path" says nothing of the rules over the path it really has
        d = Decision(False, "the access policy decides by path, and this input names none", d.roles, False, "", d.policy)
    record(req, d, {"via": via} if via else None, cwd=root)
    raise AccessDenied(denial_message(req, d, what), d)


def governs(root: Optional[str] = None) -> bool:
    """Does an access policy govern the repository around ``root`` (an opinion on a read naming no path)?

    Nothing is recorded: this asks whether to show per-user facts at all
    (git's textconv, whose output git caches for every user of the clone).
    """
    if not policies():
        return False
    root, who, reader = _local(_repo_root(os.path.abspath(root or ".")))
    return decide(AccessRequest(who, "read", root, None, read_file=reader))[1]


def check_columns(path: str, columns: Sequence[str], where: str, root: Optional[str] = None) -> None:
    """May the user read ``columns`` of the data file ``path``? `AccessDenied` naming the column and ``where`` (the pipeline, spec line) if not."""
    if not policies():
        return
    root, who, reader = _local(root)
    for col in dict.fromkeys(columns):
        req = AccessRequest(who, "read", root, path, column=col, read_file=reader)
        d, governed = decide(req)
        if not d.allowed:
            record(req, d, {"pipeline": where}, cwd=root)
            raise AccessDenied(f"{where}: {denial_message(req, d)}; no row was read", d)
        if governed:
            record(req, d, {"pipeline": where}, cwd=root)


def _option_columns(steps, key: str) -> list[str]:
    out: list[str] = []
    for step in steps:
        value = step.options.get(key) if isinstance(getattr(step, "options", None), dict) else None
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            out.extend(c for c in value if isinstance(c, str))
    return out


def check_pipeline(loaded, section: str, name: str, src: str) -> None:
    """Before ``fmhub clean``/``fmhub label`` reads a row: may the user read the columns it uses, and its rows whole?

    The columns it names (`pipeline_columns`) are checked one by one, so the
    error names the column; then the whole file, as a pipeline copies every
    column of a row to its output. ``where`` in the error is
    ``fmhub.yaml:LINE: SECTION.NAME``.
    """
    if not policies():
        return
    check_read(loaded, section, name, src, pipeline_columns(loaded, section, name))


def pipeline_columns(loaded, section: str, name: str) -> list[str]:
    """The columns ``clean.NAME`` or ``label.NAME`` names: text columns, steps' and functions' ``columns``/``column``, the key."""
    pipe = getattr(loaded.spec, section)[name]
    ds = loaded.spec.datasets.get(pipe.input)
    if section == "clean":
        columns = list(pipe.columns or [loaded.text_column(pipe.input)]) + _option_columns(pipe.steps, "columns")
    else:
        columns = [pipe.column or loaded.text_column(pipe.input)] + _option_columns(pipe.lfs, "column")
    key = getattr(pipe, "key", None) or (ds.key if ds is not None else None)
    if key:
        columns.append(key)
    return columns


def check_read(loaded, section: str, name: str, src: str, columns: Sequence[str], field: str = "input") -> None:
    """Before a pipeline of ``section`` (clean, label, join, eval, patch) reads a row of ``src``: its columns, then the file.

    ``columns`` are the ones it names (text, key, join columns), checked one by
    one so the error names the column; then the whole file, as the pipeline may
    copy every column of a row to its output. ``field`` is the spec key that
    names ``src``, for the line in the error.
    """
    if not policies():
        return
    check_file_read(loaded.root, pipeline_where(loaded, section, name, field), src, columns)


def pipeline_where(loaded, section: str, name: str, field: str = "input") -> str:
    """``fmhub.yaml:LINE: SECTION.NAME``, the line of ``field`` (or the nearest above it): how errors and records name a pipeline."""
    line = loaded.line((section, name, field))
    return f"{loaded.path}:{line}: {section}.{name}" if line else f"{loaded.path}: {section}.{name}"


def check_file_read(start: str, where: str, src: str, columns: Sequence[str] = ()) -> None:
    """`check_read` for any reader (``where`` names it): ``columns`` of ``src`` one by one, then the whole file.

    ``start``: a directory of the repository whose policy governs ``src``.
    """
    if not policies():
        return
    root = _repo_root(os.path.abspath(start))
    path = os.path.relpath(os.path.abspath(src), root).replace(os.sep, "/")
    check_columns(path, columns, where, root)
    _root, who, reader = _local(root)
    req = AccessRequest(who, "read", root, path, read_file=reader)
    d, governed = decide(req)
    if not d.allowed:
        record(req, d, {"pipeline": where}, cwd=root)
        raise AccessDenied(f"{where}: {denial_message(req, d, f'the rows of {path}')}; no row was read", d)


class RowGate:
    """Rows of one pipeline input the user may not read, withheld as batches are read (row-level security).

    Built once per run by `pipeline_rows`; `filter` wraps `fmhub.core.rows.read_batches`
    so withheld rows reach no step, function, output or report, while the
    other rows keep their file positions. ``withheld`` counts the last pass.
    """

    def __init__(self, readable: Callable[[dict], bool], request: AccessRequest, where: str, root: str) -> None:
        self.readable = readable
        self.request = request
        self.where = where
        self.root = root
        self.withheld = 0

    def filter(self, batches: Iterable):
        from fmhub.core.rows import Batch

        self.withheld = 0
        for batch in batches:
            keep = [i for i, row in enumerate(batch.rows) if self.readable(row)]
            if len(keep) == len(batch.rows):
                yield batch
                continue
            self.withheld += len(batch.rows) - len(keep)
            yield Batch([batch.positions[i] for i in keep], [batch.rows[i] for i in keep], batch.errors)

    def record(self) -> None:
        """One audit record per run with the count (never one per row, never a row's content)."""
        if self.withheld:
            record(self.request, Decision(False, "rows withheld by policy", policy="roles"),
                   {"pipeline": self.where, "rows_withheld": self.withheld}, cwd=self.root)


def pipeline_rows(loaded, section: str, name: str, src: str) -> Optional[RowGate]:
    """The rows of ``src`` the user may not read in pipeline ``section.name``: a `RowGate`, None when no policy withholds any."""
    if not any(hasattr(p, "row_filter") for p in policies()):
        return None
    return row_gate(loaded.root, pipeline_where(loaded, section, name), src)


def row_gate(start: str, where: str, src: str) -> Optional[RowGate]:
    """`pipeline_rows` for any reader (``where`` names it; ``start``: a directory of the repository governing ``src``)."""
    pols = [p for p in policies() if hasattr(p, "row_filter")]
    if not pols:
        return None
    root = _repo_root(os.path.abspath(start))
    path = os.path.relpath(os.path.abspath(src), root).replace(os.sep, "/")
    root, who, reader = _local(root)
    req = AccessRequest(who, "read", root, path, read_file=reader)
    preds = [f for f in (p.row_filter(req) for p in pols) if f is not None]
    if not preds:
        return None
    readable = preds[0] if len(preds) == 1 else (lambda row: all(f(row) for f in preds))
    return RowGate(readable, req, where, root)


@functools.lru_cache(maxsize=8)
def _repo_root(start: str) -> str:
    from fmhub.base import gitrun
    from fmhub.base.errors import FmhubError

    try:
        return gitrun.toplevel(start) or start
    except FmhubError:  # git cannot start here: the directory itself is the root
        return start
